"""`python -m benchmarks switching`: the first token of a model that was evicted, against its plain load.

Two models share a memory budget that holds one worker (a file probe and a
configured footprint, so the numbers are known), both with min_replicas = 0.
A request to A on an empty daemon measures the plain load (TTFT = spawn, load,
warm-up, first token). Then B is requested, which evicts A; then A again,
which evicts B and loads A anew. The switch costs the eviction (B drains and
exits) plus A's load, so its TTFT is compared with the plain load's.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time

from benchmarks.clients import start_stream
from benchmarks.daemon_run import RunningDaemon
from benchmarks.timing import time_tokens

GiB = 1024**3


def config(model_dir: str, probe: pathlib.Path) -> str:
    models = "".join(f"""
[[models]]
name = "{name}"
backend = "torch-lm"
path = "{model_dir}"
min_replicas = 0
max_replicas = 1
footprint = "10GiB"
threads = 1
""" for name in ("a", "b"))
    return f'[daemon]\ndrain_grace = "5s"\n[memory]\nprobe = "file:{probe}"\nmin_residency = "0s"\n{models}'


def measure(model_dir: str, rounds: int = 3, max_tokens: int = 8) -> dict:
    probe = pathlib.Path(tempfile.mkdtemp(prefix="mpsd-switch-")) / "memory.json"
    probe.write_text(json.dumps({"budget_bytes": 15 * GiB, "used_bytes": 0}))  # one 10 GiB worker fits, two do not
    daemon = RunningDaemon(config(model_dir, probe))
    try:
        plain = _ttft(daemon, "a", max_tokens)
        warm = _ttft(daemon, "a", max_tokens)
        switches = []
        for _ in range(rounds):
            _ttft(daemon, "b", max_tokens)
            switches.append(_ttft(daemon, "a", max_tokens))
        evictions = sum("demand:" in line and "evicted for model" in line for line in daemon.log().splitlines())
    finally:
        daemon.stop()
    return {"plain_load_ttft_s": plain, "warm_ttft_s": warm, "switch_ttft_s": switches,
            "switch_vs_plain": sum(switches) / len(switches) / plain, "evictions": evictions}


def _ttft(daemon: RunningDaemon, model: str, max_tokens: int) -> float:
    started = time.perf_counter()
    return time_tokens(start_stream(daemon.inference, model, "The module provides", max_tokens), started).ttft_s
