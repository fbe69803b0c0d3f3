"""The concurrency sweep for mpsd and for in-process decoding: one row of cells per worker count.

A row is measured on one running system: a short warm-up that reaches every
worker, then one cell per stream level (benchmarks.load.run_cell). The
1-worker mpsd row also yields what a daemon alone shows: start to READY,
memory, sequential TTFT and the restart after kill -9.
"""

from __future__ import annotations

import itertools
import pathlib
import statistics
import time
from typing import Callable, Iterator

from benchmarks import clients
from benchmarks.daemon_run import RunningDaemon
from benchmarks.load import run_cell, timed
from benchmarks.settings import Settings, cores, worker_threads
from benchmarks.timing import percentiles_ms

Progress = Callable[[str], None]
StartFor = Callable[[str, int], Iterator[object]]   # (prompt, max_tokens) -> a stream sent now (load.Start)


class Prompts:
    """A distinct prompt for each request ("<n> <base>"), so no server answers one from a cache of another
    (mlx_lm.server keeps a prompt cache); each row sends the same sequence."""

    def __init__(self, base: str) -> None:
        self._base = base
        self._count = itertools.count()

    def next(self) -> str:
        return f"{next(self._count)} {self._base}"


def lm_config(replicas: int, threads: int, model_dir: str, backend: str = "torch-lm", concurrency: int = 16,
              model_keys: str = "") -> str:
    """model_keys: more lines for the model's table (routing, prefix_cache)."""
    path = f'path = "{model_dir}"' if model_dir else ""
    return f"""
[daemon]
drain_grace = "5s"
[[models]]
name = "bench"
backend = "{backend}"
{path}
replicas = {replicas}
threads = {threads}
concurrency = {concurrency}
queue = 256
{model_keys}
env = {{ OMP_NUM_THREADS = "{threads}", OPENBLAS_NUM_THREADS = "{threads}" }}
"""


def measure_row(start: StartFor, settings: Settings, levels: tuple[int, ...], max_tokens: int,
                warm_streams: int) -> list[dict]:
    """Warm-up (2 tokens on warm_streams streams: every worker, every batch shape), then one cell per level:
    the best of settings.cell_repeats runs by tok/s (other jobs on the machine only ever slow a run down), with
    every run's tok/s kept beside it."""
    prompts = Prompts(settings.prompt)
    run_cell(lambda: start(prompts.next(), 2), warm_streams)
    cells = []
    for streams in levels:
        rounds = settings.single_rounds if streams == 1 else 1
        runs = [run_cell(lambda: start(prompts.next(), max_tokens), streams, rounds)
                for _ in range(settings.cell_repeats)]
        best = max(runs, key=lambda c: c["tps"])
        cells.append({**best, "tps_runs": [c["tps"] for c in runs],
                      "requests_all_runs": sum(c["requests"] for c in runs),
                      "failures_all_runs": sum(c["failures"] for c in runs),
                      "overtaken_all_runs": sum(c["overtaken"] for c in runs)})
    return cells


def mpsd_rows(settings: Settings, model_dir: str, progress: Progress, backend: str = "torch-lm",
              levels: tuple[int, ...] | None = None, max_tokens: int | None = None,
              paired_with: StartFor | None = None) -> tuple[dict, dict]:
    """({workers: cells} for each worker count, what the 1-worker daemon showed besides: with paired_with,
    single streams alternating with that in-process decoding)."""
    levels = levels or settings.stream_levels
    max_tokens = max_tokens or settings.max_tokens
    rows: dict[str, list[dict]] = {}
    single: dict = {}
    for workers in settings.worker_counts:
        threads = worker_threads(workers, cores())
        progress(f"mpsd {backend}: {workers} worker(s) x {threads} thread(s), concurrency {settings.concurrency}, "
                 f"streams {', '.join(map(str, levels))}")
        started = time.perf_counter()
        daemon = RunningDaemon(lm_config(workers, threads, model_dir, backend, settings.concurrency))
        try:
            daemon.wait_ready(workers)
            start_to_ready = time.perf_counter() - started
            start = lambda prompt, n: clients.start_stream(daemon.inference, "bench", prompt, n)  # noqa: E731
            rows[str(workers)] = measure_row(start, settings, levels, max_tokens, workers * settings.concurrency)
            if workers == 1 and paired_with is not None:
                single = _single_worker_figures(daemon, start, settings, model_dir, start_to_ready)
                single["paired"] = paired_single(start, paired_with, settings)
        finally:
            daemon.stop()
        progress(f"mpsd {backend}: {workers} worker(s): " + row_line(rows[str(workers)]))
    return rows, single


def _single_worker_figures(daemon: RunningDaemon, start: StartFor, settings: Settings, model_dir: str,
                           start_to_ready: float) -> dict:
    prompts = Prompts(settings.prompt)
    ttfts = [timed(lambda: start(prompts.next(), 1)).ttft_s for _ in range(settings.ttft_requests)]
    worker = daemon.status()["workers"][0]
    weights = sum(p.stat().st_size for p in pathlib.Path(model_dir).glob("*.safetensors"))
    rss = (worker.get("process_memory") or {}).get("rss_bytes") or worker["memory_bytes"]  # memory_bytes: footprint
    return {
        "ttft_ms": percentiles_ms(ttfts),
        "daemon_rss_bytes": daemon.rss_bytes(),
        "worker_rss_bytes": rss,
        "worker_rss_beyond_weights_bytes": max(0, rss - weights),
        "start_to_ready_s": round(start_to_ready, 3),
        "warm_s": daemon.warm_times_s(),
        "restart_s": round(daemon.restart_after_kill_s(worker["id"]), 3),
    }


def paired_single(mpsd: StartFor, direct: StartFor, settings: Settings) -> dict:
    """Single streams through mpsd and in-process in turn (single_rounds pairs), so the minutes-long drift of a
    shared machine hits both alike: the ratio of the two is this run's figure for the hop's cost."""
    prompts = Prompts(settings.prompt)
    pairs = []
    for _ in range(settings.single_rounds):
        prompt = prompts.next()
        pairs.append((timed(lambda: direct(prompt, settings.max_tokens)), timed(lambda: mpsd(prompt, settings.max_tokens))))
    rate = lambda timings: sum(t.tokens for t in timings) / sum(t.total_s for t in timings)  # noqa: E731
    direct_timings, mpsd_timings = [d for d, _ in pairs], [m for _, m in pairs]
    ratios = [(m.tokens / m.total_s) / (d.tokens / d.total_s) for d, m in pairs]
    return {"pairs": len(pairs), "direct_tps": round(rate(direct_timings), 1), "mpsd_tps": round(rate(mpsd_timings), 1),
            "ratio_median": round(statistics.median(ratios), 4), "ratios": [round(x, 3) for x in ratios],
            "direct_itl_ms": percentiles_ms([g for t in direct_timings for g in t.gaps_s]),
            "mpsd_itl_ms": percentiles_ms([g for t in mpsd_timings for g in t.gaps_s])}


def direct_row(settings: Settings, start: StartFor, progress: Progress) -> tuple[list[dict], dict]:
    """In-process cells up to one worker's concurrency (start: a stream of the loaded in-process scheduler),
    and sequential 1-token TTFT."""
    levels = tuple(n for n in settings.stream_levels if n <= settings.concurrency)
    progress(f"direct: in-process decoding, {worker_threads(1, cores())} thread(s), streams {', '.join(map(str, levels))}")
    cells = measure_row(start, settings, levels, settings.max_tokens, settings.concurrency)
    prompts = Prompts(settings.prompt)
    ttft = percentiles_ms([timed(lambda: start(prompts.next(), 1)).ttft_s for _ in range(settings.ttft_requests)])
    progress("direct: " + row_line(cells))
    return cells, ttft


def step_profile(steps) -> dict:
    """What the decode loop's steps cost (scheduler.steps): decode-only steps by rows, and the steps that also
    prefilled joining prompts, the slowest first."""
    by_rows: dict[int, list[float]] = {}
    prefilling = []
    for step in steps:
        if step.prefill_tokens:
            prefilling.append(step)
        else:
            by_rows.setdefault(step.decode_rows, []).append(step.seconds)
    slowest = sorted(prefilling, key=lambda s: -s.seconds)[:5]
    return {
        "decode_only_ms": {str(rows): {"steps": len(v), "p50": round(statistics.median(v) * 1000, 2)}
                           for rows, v in sorted(by_rows.items()) if len(v) >= 3},
        "with_prefill": {"steps": len(prefilling),
                         "p50_ms": round(statistics.median([s.seconds for s in prefilling]) * 1000, 2) if prefilling else 0,
                         "slowest": [{"prefill_tokens": s.prefill_tokens, "decode_rows": s.decode_rows,
                                      "ms": round(s.seconds * 1000, 2)} for s in slowest]},
    }


def row_line(cells: list[dict]) -> str:
    return "; ".join(f"{c['streams']} streams {c['tps']:.0f} tok/s, TTFT p99 {c['ttft_ms']['p99']:.0f} ms"
                     + (f", {c['failures']} failed" if c["failures"] else "") for c in cells)


