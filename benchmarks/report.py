"""results.json, a Markdown report and a PNG chart (chart.py) from one run's results."""

from __future__ import annotations

import json
import pathlib

from benchmarks import chart


def write(results: dict, out_dir: pathlib.Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    results["chart"] = chart.draw(results, out_dir / "chart.png")
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    text = markdown(results)
    (out_dir / "results.md").write_text(text + "\n")
    return text


def markdown(r: dict) -> str:
    model, machine = r["model"], r["machine"]
    head = [f"Model: **{model['name']}** (torch: `{model['torch_dir']}`; MLX: `{model['mlx_dir'] or 'none'}`). "
            f"{machine['cores']} cores, {machine['platform']}, Python {machine['python']}. "
            f"`{r.get('command', 'python -m benchmarks run')}` took {r.get('elapsed_s', 0):.0f} s."]
    return "\n\n".join([*head, _targets(r), _sweep(r), _failures(r), _single(r), _steps(r), _transport(r), *_mlx(r),
                        _peers(r)])


def _failures(r: dict) -> str:
    cells = [c for rows in r["sweep"]["systems"].values() for cells in rows.values() for c in cells]
    failed = sum(c.get("failures_all_runs", c["failures"]) for c in cells)
    requests = sum(c.get("requests_all_runs", c["requests"]) for c in cells)
    examples = sorted({e for c in cells for e in c["failure_examples"]})[:3]
    return f"Failed streams over every run of every sweep cell: {failed} of {requests}" + (
        f" ({'; '.join(examples)})." if examples else ".")


def _steps(r: dict) -> str:
    if "direct_steps" not in r:
        return ""
    steps = r["direct_steps"]
    rows = ["The decode loop's steps in-process (direct cells): what one step cost.\n",
            "| step | steps | ms |", "|---|---|---|"]
    rows += [f"| decode only, {n} row(s), p50 | {v['steps']} | {v['p50']:.1f} |"
             for n, v in steps["decode_only_ms"].items()]
    pre = steps["with_prefill"]
    rows.append(f"| with prefill of joining prompts, p50 | {pre['steps']} | {pre['p50_ms']:.1f} |")
    rows += [f"| slowest with prefill: {s['prefill_tokens']} prompt tokens, {s['decode_rows']} decoding rows | 1 "
             f"| {s['ms']:.1f} |" for s in pre["slowest"]]
    return "\n".join(rows)


def _targets(r: dict) -> str:
    mark = {True: "met", False: "**missed**", None: "not measured"}
    rows = ["| target | this run | |", "|---|---|---|"]
    rows += [f"| {t['target']} | {t['value']} | {mark[t['met']]} |" for t in r["targets"]]
    return "Targets (reported, not asserted):\n\n" + "\n".join(rows)


def cell_rows(systems: dict, header: str) -> str:
    rows = [header, "| system | workers | streams | tok/s | vs 1 stream | TTFT p50 / p99 ms | inter-token p99 ms "
            "| failed | out of order | others (cores) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, by_workers in systems.items():
        for workers, cells in by_workers.items():
            base = cells[0]["tps"] or 1.0
            for c in cells:
                rows.append(f"| {name} | {workers} | {c['streams']} | {c['tps']:.0f}{_runs(c)} | {c['tps'] / base:.2f}x "
                            f"| {c['ttft_ms']['p50']:.0f} / {c['ttft_ms']['p99']:.0f} | {c['itl_ms']['p99']:.1f} "
                            f"| {c['failures']} | {c['overtaken']} | {_cores(c.get('others_cores'))} |")
    return "\n".join(rows)


def _runs(c: dict) -> str:
    runs = c.get("tps_runs", [])
    return f" (runs {' / '.join(f'{x:.0f}' for x in runs)})" if len(runs) > 1 else ""


def _cores(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def _sweep(r: dict) -> str:
    s = r["sweep"]
    repeats = r["machine"]["settings"].get("cell_repeats", 1)
    best = f"best of {repeats} runs by tok/s; " if repeats > 1 else ""
    return cell_rows(s["systems"], f"Concurrency sweep: {s['tokens_per_stream']} tokens per stream, greedy, "
                     f"concurrency (batch) {s['concurrency']} per worker or replica; {best}*direct* is in-process; "
                     "*others*: cores busy outside this benchmark during the cell.\n")


def _single(r: dict) -> str:
    ttft = r["ttft_ms"]
    rows = [
        "| one stream | value |", "|---|---|",
        f"| direct (in-process) tokens/s, alternating with mpsd | {r['direct_tps']:.0f} |",
        f"| mpsd 1 worker tokens/s | {r['mpsd_tps']:.0f} ({r['mpsd_vs_direct']:.1%} of direct: median of "
        f"{r['single_pairs']['pairs']} pairs {r['single_pairs']['ratios']}) |",
        f"| mpsd added latency per token p50 / p99 | {r['per_token_overhead_ms']['p50']:.3f} / "
        f"{r['per_token_overhead_ms']['p99']:.3f} ms |",
        *(f"| TTFT {name}, sequential 1-token requests, p50 / p99 | {v['p50']:.1f} / {v['p99']:.1f} ms |"
          for name, v in ttft.items()),
        f"| daemon RSS | {r['daemon_rss_bytes'] / 2**20:.0f} MiB |",
        f"| worker RSS beyond the weights | {r['worker_rss_beyond_weights_bytes'] / 2**20:.0f} MiB |",
        f"| start to READY, 1 worker / restart after kill -9 | {r['start_to_ready_s']:.1f} / {r['restart_s']:.1f} s |",
    ]
    s = r["scaling"]
    rows += [f"| {w} worker(s), {s['streams']} streams: tokens/s (ideal {i:.0f}) | {m:.0f} ({m / s['mpsd'][0]:.2f}x) |"
             for w, m, i in zip(s["workers"], s["mpsd"], s["ideal"])]
    return "\n".join(rows)


def _transport(r: dict) -> str:
    t = r["transport"]
    rows = ["Transport: the zero-compute null-lm backend, 1 worker; CPU per 1,000 streamed tokens.\n",
            "| streams | through mpsd tok/s | in-process tok/s | daemon CPU ms | worker CPU ms | clients CPU ms "
            "| wall ms |", "|---|---|---|---|---|---|---|"]
    for n, tps in t["tps"].items():
        cpu = t["cpu_ms_per_1k_tokens"][n]
        rows.append(f"| {n} | {tps:.0f} | {t['inprocess_tps'][n]:.0f} | {cpu['daemon']:.0f} | {cpu['worker']:.0f} "
                    f"| {cpu['clients']:.0f} | {cpu['wall']:.0f} |")
    return "\n".join(rows)


def _mlx(r: dict) -> list[str]:
    if "mlx" not in r:
        return []
    m = r["mlx"]
    systems = {"mpsd mlx-lm": m["mpsd-mlx"]}
    if "rows" in m["mlx_lm.server"]:
        systems["mlx_lm.server"] = m["mlx_lm.server"]["rows"]
    return [cell_rows(systems, f"MLX (CPU backend), `{m['model_dir']}`: {m['tokens_per_stream']} tokens per stream.\n")]


def _peers(r: dict) -> str:
    peers = dict(r["peers"])
    if "mlx" in r:
        peers["mlx_lm.server"] = r["mlx"]["mlx_lm.server"]
    rows = ["| peer | version | batching settings | start to READY s |", "|---|---|---|---|"]
    for name, peer in peers.items():
        if "error" in peer:
            rows.append(f"| {name} | not run: {peer['error']} | | |")
        else:
            starts = " / ".join(f"{s:.1f}" for s in peer["start_to_ready_s"])
            rows.append(f"| {name} | {peer['version']} | {peer['batching']} | {starts} |")
    return "\n".join(rows)
