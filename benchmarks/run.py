"""One benchmark run: every system on the same model, prompts and machine, one after another.

Absolute numbers on a shared 2-core machine drift from minute to minute, so
the report leads with ratios taken within this one run.
"""

from __future__ import annotations

import platform
import time
from typing import Callable

from benchmarks import clients, inprocess
from benchmarks.daemon_run import RunningDaemon
from benchmarks.peers import PEERS, run_peers
from benchmarks.settings import Settings, cores, worker_threads
from benchmarks.timing import percentiles_ms
from mpsd import paths

Progress = Callable[[str], None]


def lm_config(replicas: int, threads: int, model_dir: str, backend: str = "torch-lm", concurrency: int = 1) -> str:
    path = f'path = "{model_dir}"' if backend == "torch-lm" else ""
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
"""


def run(settings: Settings, model_dir: str, progress: Progress = print, peers: bool = True) -> dict:
    n_cores = cores()
    results: dict = {"machine": {"cores": n_cores, "python": platform.python_version(), "platform": platform.platform(),
                                 "model": model_dir, "settings": vars(settings)}}
    results.update(_direct(settings, model_dir, n_cores, progress))
    results.update(_mpsd_single(settings, model_dir, n_cores, results, progress))
    results["transport_tps"], results["transport_cpu_ms_per_1k_tokens"] = _transport(settings, progress)
    results["scaling"] = _scaling(settings, model_dir, n_cores, progress)
    results["peers"] = run_peers(settings, model_dir, progress) if peers else {
        name: {"error": "skipped (--no-peers)"} for name in PEERS}
    for name, peer in results["peers"].items():
        if "ttft_ms" in peer:
            results["ttft_ms"][name] = peer["ttft_ms"]
    return results


def _direct(settings: Settings, model_dir: str, n_cores: int, progress: Progress) -> dict:
    progress(f"direct: in-process decoding, {worker_threads(1, n_cores)} thread(s)")
    model = inprocess.load(model_dir, worker_threads(1, n_cores))
    runs = [inprocess.decode(model, settings.prompt, settings.max_tokens) for _ in range(settings.repeats)]
    tokens, seconds = sum(r.tokens for r in runs), sum(r.total_s for r in runs)
    gaps = [g for r in runs for g in r.gaps_s]
    ttfts = [inprocess.decode(model, settings.prompt, 1).ttft_s for _ in range(settings.ttft_requests)]
    return {"direct_tps": tokens / seconds, "_direct_gaps": gaps, "ttft_ms": {"direct": percentiles_ms(ttfts)}}


def _mpsd_single(settings: Settings, model_dir: str, n_cores: int, results: dict, progress: Progress) -> dict:
    progress("mpsd: 1 worker, 1 stream")
    daemon = RunningDaemon(lm_config(1, worker_threads(1, n_cores), model_dir))
    try:
        started = time.perf_counter()
        daemon.wait_ready(1)
        start_to_ready = time.perf_counter() - started
        timings = [clients.timed_stream(daemon.inference, "bench", settings.prompt, settings.max_tokens)
                   for _ in range(settings.repeats)]
        ttfts = [clients.timed_stream(daemon.inference, "bench", settings.prompt, 1).ttft_s
                 for _ in range(settings.ttft_requests)]
        worker = daemon.status()["workers"][0]
        memory = {
            "daemon_rss_bytes": daemon.rss_bytes(),
            "worker_rss_bytes": worker["memory_bytes"],
            "worker_rss_beyond_weights_bytes": max(0, worker["memory_bytes"] - _weights_bytes(model_dir)),
            "start_to_ready_s": round(start_to_ready, 3),
            "warm_s": daemon.warm_times_s(),
            "restart_s": round(daemon.restart_after_kill_s(worker["id"]), 3),
        }
    finally:
        daemon.stop()
    tps = sum(t.tokens for t in timings) / sum(t.total_s for t in timings)
    gaps = [g for t in timings for g in t.gaps_s]
    direct_gaps = results.pop("_direct_gaps")
    overhead = {q: round(percentiles_ms(gaps)[q] - percentiles_ms(direct_gaps)[q], 3) for q in ("p50", "p99")}
    ttft = dict(results["ttft_ms"], mpsd=percentiles_ms(ttfts))
    return {"mpsd_tps": tps, "mpsd_vs_direct": tps / results["direct_tps"], "per_token_overhead_ms": overhead,
            "ttft_ms": ttft, **memory}


def _transport(settings: Settings, progress: Progress) -> tuple[dict, dict]:
    progress("transport: null-lm worker, 1 and 8 streams")
    daemon = RunningDaemon(lm_config(1, 1, "", backend="null-lm", concurrency=8))
    tps, cpu = {}, {}
    try:
        daemon.wait_ready(1)
        for streams in (1, 8):
            cpu_before = daemon.cpu_seconds()
            rate, _ = clients.aggregate_tps(daemon.inference, "bench", "x", settings.transport_tokens // streams,
                                            streams, 1)
            tokens = (settings.transport_tokens // streams) * streams
            tps[str(streams)] = rate
            cpu[str(streams)] = round((daemon.cpu_seconds() - cpu_before) / tokens * 1000 * 1000, 3)
    finally:
        daemon.stop()
    return tps, cpu


def _scaling(settings: Settings, model_dir: str, n_cores: int, progress: Progress) -> dict:
    scaling: dict = {"workers": [], "mpsd": [], "threads": [], "ideal": []}
    for count in range(1, settings.max_workers + 1):
        threads_each = worker_threads(count, n_cores)
        progress(f"scaling: {count} worker(s) x {threads_each} thread(s), and {count} thread(s) in one process")
        daemon = RunningDaemon(lm_config(count, threads_each, model_dir))
        try:
            daemon.wait_ready(count)
            mpsd_rate, _ = clients.aggregate_tps(daemon.inference, "bench", settings.prompt, settings.max_tokens,
                                                 count, settings.repeats)
        finally:
            daemon.stop()
        scaling["workers"].append(count)
        scaling["mpsd"].append(mpsd_rate)
        scaling["threads"].append(inprocess.threads_tps(model_dir, count, threads_each, settings.prompt,
                                                        settings.max_tokens, settings.repeats))
        scaling["ideal"].append(scaling["mpsd"][0] * count)
    return scaling


def _weights_bytes(model_dir: str) -> int:
    import pathlib

    return sum(p.stat().st_size for p in pathlib.Path(model_dir).glob("*.safetensors"))


def default_model_dir() -> str:
    return str(paths.demo_model_dir())


