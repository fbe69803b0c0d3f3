"""Where issue 13's targets stand in one run's results: reported, never asserted (a shared machine is noisy).

Pure functions of the results dict, so the report and the docs read one judgement.
"""

from __future__ import annotations

BATCH_GAIN = 3.5        # 16 streams on 1 worker vs that worker's single stream
SINGLE_VS_DIRECT = 0.95


def cell(rows: dict, workers: int, streams: int) -> dict | None:
    return next((c for c in rows.get(str(workers), []) if c["streams"] == streams), None)


def evaluate(r: dict) -> list[dict]:
    sweep = r["sweep"]
    systems = sweep["systems"]
    mpsd = systems["mpsd"]
    c = sweep["concurrency"]
    found = [_batch_gain(mpsd, c), *_against_peers(systems, c), _single_vs_direct(r), *_queueing(systems)]
    if "mlx" in r:
        found.extend(_mlx(r["mlx"], c))
    return found


def _target(name: str, value: str, met: bool | None) -> dict:
    return {"target": name, "value": value, "met": met}


def _batch_gain(mpsd: dict, c: int) -> dict:
    name = f"{c} streams on 1 worker >= {BATCH_GAIN}x its single stream"
    one, many = cell(mpsd, 1, 1), cell(mpsd, 1, c)
    if not (one and many and one["tps"]):
        return _target(name, "not measured", None)
    gain = many["tps"] / one["tps"]
    return _target(name, f"{gain:.2f}x ({many['tps']:.0f} vs {one['tps']:.0f} tok/s)", gain >= BATCH_GAIN)


def _against_peers(systems: dict, c: int) -> list[dict]:
    ours = cell(systems["mpsd"], 2, c)
    found = []
    for name, rows in systems.items():
        if name in ("mpsd", "direct"):
            continue
        theirs = cell(rows, 2, c)
        label = f"{c} streams on 2 workers vs {name}: tok/s ahead, TTFT p99 no worse"
        if not (ours and theirs):
            found.append(_target(label, "not measured", None))
            continue
        ratio = ours["tps"] / theirs["tps"] if theirs["tps"] else float("inf")
        value = (f"{ours['tps']:.0f} vs {theirs['tps']:.0f} tok/s ({ratio:.2f}x); TTFT p99 "
                 f"{ours['ttft_ms']['p99']:.0f} vs {theirs['ttft_ms']['p99']:.0f} ms")
        found.append(_target(label, value, ours["tps"] >= theirs["tps"]
                             and ours["ttft_ms"]["p99"] <= theirs["ttft_ms"]["p99"]))
    return found


def _single_vs_direct(r: dict) -> dict:
    name = f"1 stream through mpsd >= {SINGLE_VS_DIRECT:.2f}x in-process decoding"
    if not r.get("direct_tps"):
        return _target(name, "not measured", None)
    ratio, pairs = r["mpsd_vs_direct"], r["single_pairs"]["pairs"]
    return _target(name, f"{ratio:.1%} (median of {pairs} alternating pairs; {r['mpsd_tps']:.0f} vs "
                         f"{r['direct_tps']:.0f} tok/s)", ratio >= SINGLE_VS_DIRECT)


def _queueing(systems: dict) -> list[dict]:
    """The largest level of each mpsd row: above concurrency x workers it queues; in order, none failing."""
    found = []
    for workers, cells in systems["mpsd"].items():
        last = cells[-1]
        failed = last.get("failures_all_runs", last["failures"])
        jumped = last.get("overtaken_all_runs", last["overtaken"])
        requests = last.get("requests_all_runs", last["requests"])
        value = (f"{failed} of {requests} streams failed, {jumped} served out of order (all runs of the cell); "
                 f"TTFT p99 {last['ttft_ms']['p99']:.0f} ms")
        found.append(_target(f"{last['streams']} streams on {workers} worker(s): queued in order, none fails", value,
                             failed == 0 and jumped == 0))
    return found


def _mlx(mlx: dict, c: int) -> list[dict]:
    server = mlx.get("mlx_lm.server", {})
    theirs = cell(server.get("rows", {}), 1, c)
    found = []
    for workers in mlx["mpsd-mlx"]:
        ours = cell(mlx["mpsd-mlx"], int(workers), c)
        label = f"mlx-lm, {workers} worker(s), {c} streams vs mlx_lm.server: tok/s >=, TTFT p50 <="
        if not (ours and theirs):
            found.append(_target(label, "not measured", None))
            continue
        value = (f"{ours['tps']:.0f} vs {theirs['tps']:.0f} tok/s; TTFT p50 {ours['ttft_ms']['p50']:.0f} vs "
                 f"{theirs['ttft_ms']['p50']:.0f} ms")
        found.append(_target(label, value, ours["tps"] >= theirs["tps"]
                             and ours["ttft_ms"]["p50"] <= theirs["ttft_ms"]["p50"]))
    return found
