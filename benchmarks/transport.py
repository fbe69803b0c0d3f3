"""mpsd's own ceiling: the zero-compute null-lm backend through the daemon, against the same engine in-process.

Each cell streams transport_tokens tokens in all over 1, 8 and 16 streams on
one worker (concurrency 16), and reads the CPU time the daemon, the worker and
this process (the clients) spent, per 1,000 tokens. In-process, the same
NullLM under the same DecodeScheduler shows what the worker's loop alone
could give: the gap between the two is the cost of the hop (one message
per decode step worker to daemon, one per token per stream daemon to client).
"""

from __future__ import annotations

import time
from typing import Callable

from benchmarks import clients, inprocess, processes
from benchmarks.daemon_run import RunningDaemon
from benchmarks.load import run_cell
from benchmarks.settings import Settings
from benchmarks.sweep import lm_config

Progress = Callable[[str], None]


def measure(settings: Settings, progress: Progress) -> dict:
    levels = settings.transport_levels
    progress(f"transport: null-lm, 1 worker, streams {', '.join(map(str, levels))}")
    result: dict = {"tps": {}, "cpu_ms_per_1k_tokens": {}, "inprocess_tps": {}, "failures": 0}
    daemon = RunningDaemon(lm_config(1, 1, "", backend="null-lm", concurrency=max(levels)))
    try:
        daemon.wait_ready(1)
        worker_pid = daemon.status()["workers"][0]["pid"]
        start = lambda n: clients.start_stream(daemon.inference, "bench", "x", n)  # noqa: E731
        run_cell(lambda: start(8), max(levels))
        for streams in levels:
            before = _cpu(daemon, worker_pid)
            cell = run_cell(lambda: start(settings.transport_tokens // streams), streams)
            spent = {k: v - before[k] for k, v in _cpu(daemon, worker_pid).items()}
            per_1k = {k: round(v / max(1, cell["tokens"]) * 1e6, 3) for k, v in spent.items()}
            per_1k["wall"] = round(cell["seconds"] / max(1, cell["tokens"]) * 1e6, 3)
            result["tps"][str(streams)] = cell["tps"]
            result["cpu_ms_per_1k_tokens"][str(streams)] = per_1k
            result["failures"] += cell["failures"]
    finally:
        daemon.stop()
    scheduler = inprocess.load_null(max(levels))
    try:
        for streams in levels:
            cell = run_cell(lambda: inprocess.start(scheduler, "x", settings.transport_tokens // streams), streams)
            result["inprocess_tps"][str(streams)] = cell["tps"]
    finally:
        scheduler.stop()
    progress("transport: " + "; ".join(
        f"{n} streams {result['tps'][str(n)]:.0f} tok/s (in-process {result['inprocess_tps'][str(n)]:.0f}), "
        f"daemon {result['cpu_ms_per_1k_tokens'][str(n)]['daemon']:.0f} ms CPU per 1k" for n in levels))
    return result


def _cpu(daemon: RunningDaemon, worker_pid: int) -> dict[str, float]:
    return {"daemon": daemon.cpu_seconds(), "worker": processes.cpu_seconds(worker_pid),
            "clients": time.process_time()}
