"""One benchmark run: every system on the same model, prompts and machine, one after another.

Absolute numbers on a shared 2-core machine drift from minute to minute, so
the report leads with ratios taken within this one run.
"""

from __future__ import annotations

import platform
from typing import Callable

from benchmarks import inprocess, mlx_compare, targets, transport
from benchmarks.models import BenchModel
from benchmarks.peers import PEERS, run_peers
from benchmarks.settings import Settings, cores, worker_threads
from benchmarks.sweep import direct_row, mpsd_rows, step_profile
from benchmarks.targets import cell

Progress = Callable[[str], None]


def run(settings: Settings, model: BenchModel, progress: Progress = print, peers: bool = True) -> dict:
    results: dict = {"machine": {"cores": cores(), "python": platform.python_version(), "platform": platform.platform(),
                                 "settings": vars(settings)},
                     "model": {"name": model.name, "torch_dir": model.torch_dir, "mlx_dir": model.mlx_dir}}
    scheduler = inprocess.load(model.torch_dir, worker_threads(1, cores()), settings.concurrency)
    try:
        direct_start = lambda prompt, n: inprocess.start(scheduler, prompt, n)  # noqa: E731
        direct, direct_ttft = direct_row(settings, direct_start, progress)
        results["direct_steps"] = step_profile(scheduler.steps)
        mpsd, single = mpsd_rows(settings, model.torch_dir, progress, paired_with=direct_start)
    finally:
        scheduler.stop()
    systems = {"direct": {"1": direct}, "mpsd": mpsd}
    peer_results = run_peers(settings, model.torch_dir, progress) if peers else {
        name: {"error": "skipped (--no-peers)"} for name in PEERS}
    for name, peer in peer_results.items():
        if "rows" in peer:
            systems[name] = peer.pop("rows")
    results["sweep"] = {"levels": list(settings.stream_levels), "workers": list(settings.worker_counts),
                        "tokens_per_stream": settings.max_tokens, "concurrency": settings.concurrency,
                        "systems": systems}
    results["peers"] = peer_results
    results.update(_single_stream(direct_ttft, single))
    results["scaling"] = _scaling(mpsd, settings)
    results["transport"] = transport.measure(settings, progress)
    if settings.mlx_levels and model.mlx_dir:
        results["mlx"] = mlx_compare.measure(settings, model.mlx_dir, progress, server=peers)
        results["mlx"]["model_dir"] = model.mlx_dir
    results["targets"] = targets.evaluate(results)
    return results


def _single_stream(direct_ttft: dict, single: dict) -> dict:
    """The 1-stream figures, from streams alternating between mpsd and in-process: tok/s, the added latency per
    token; and sequential TTFT, memory."""
    paired = single["paired"]
    overhead = {q: round(paired["mpsd_itl_ms"][q] - paired["direct_itl_ms"][q], 3) for q in ("p50", "p99")}
    figures = {k: v for k, v in single.items() if k not in ("ttft_ms", "paired")}
    return {"direct_tps": paired["direct_tps"], "mpsd_tps": paired["mpsd_tps"], "mpsd_vs_direct": paired["ratio_median"],
            "single_pairs": paired, "per_token_overhead_ms": overhead,
            "ttft_ms": {"direct": direct_ttft, "mpsd": single["ttft_ms"]}, **figures}


def _scaling(mpsd: dict, settings: Settings) -> dict:
    """Workers against aggregate tok/s at the most streams measured, which keep every worker's batch full."""
    streams = max(settings.stream_levels)
    workers = [int(w) for w in mpsd]
    rates = [cell(mpsd, w, streams)["tps"] for w in workers]
    return {"streams": streams, "workers": workers, "mpsd": rates, "ideal": [rates[0] * w for w in workers]}
