"""The predict benchmark's targets (the issue's: batched >= 3x unbatched at 32 clients, and ahead of LitServe;
reported, never asserted) and its report: results.json and results.md. Pure functions of the results dict."""

from __future__ import annotations

import json
import pathlib
import statistics

SPEEDUP_TARGET = 3.0
UNBATCHED, BATCHED, LITSERVE = "mpsd unbatched", "mpsd batched", "LitServe"


def _ratio(results: dict, numerator: str, denominator: str) -> float | None:
    rounds = results.get("ratios", {}).get(f"{numerator} / {denominator}")
    return statistics.median(rounds) if rounds else None


def targets(results: dict) -> list[dict]:
    most = max(results["sizes"]["levels"])
    found = []
    for numerator, denominator, target, met in (
            (BATCHED, UNBATCHED, f"mpsd batched >= {SPEEDUP_TARGET:g}x unbatched throughput at {most} clients",
             lambda r: r >= SPEEDUP_TARGET),
            (BATCHED, LITSERVE, f"mpsd batched ahead of LitServe (batched) at {most} clients", lambda r: r > 1.0)):
        ratio = _ratio(results, numerator, denominator)
        found.append({"target": target, "value": "not measured" if ratio is None else f"{ratio:.2f}x "
                      "(median of the rounds' ratios)", "met": None if ratio is None else met(ratio)})
    return found


def _label(results: dict, name: str) -> str:
    settings = results.get("settings", {}).get(name)
    return f"{name} ({settings})" if settings else name


def _system_rows(results: dict) -> list[str]:
    lines = ["| system | clients | req/s | req/s by round | p50 ms | p99 ms | failed |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for name, cells in results["systems"].items():
        if "error" in cells:
            lines.append(f"| {_label(results, name)} | | not run: {cells['error']} | | | | |")
            continue
        for clients, cell in cells.items():
            latency, rounds = cell["latency_ms"], ", ".join(f"{r:,.0f}" for r in cell.get("rps_rounds", []))
            lines.append(f"| {_label(results, name)} | {clients} | {cell['rps']:,.0f} | {rounds} | "
                         f"{latency['p50']:.2f} | {latency['p99']:.2f} | {cell['failures']} |")
    return lines


def _cpu_rows(results: dict) -> list[str]:
    """CPU per reply at the most clients, by process: where a reply's cost goes on a machine of few cores."""
    most = str(max(results["sizes"]["levels"]))
    cells = {name: levels[most] for name, levels in results["systems"].items()
             if levels.get(most, {}).get("cpu_ms_per_reply")}
    if not cells:
        return []
    lines = ["", f"CPU per reply at {most} clients (ms; warm-up included; the client is this benchmark's process):",
             "", "| system | by process | total |", "|---|---|---:|"]
    for name, cell in cells.items():
        spent = cell["cpu_ms_per_reply"]
        lines.append(f"| {_label(results, name)} | {', '.join(f'{role} {ms:.2f}' for role, ms in spent.items())} | "
                     f"{sum(spent.values()):.2f} |")
    return lines


def _sweep_rows(results: dict, family: str, sweep: dict) -> list[str]:
    most = max(results["sizes"]["levels"])
    lines = ["", f"{family}: the settings tried at {most} clients, one after another (the best runs in the table):",
             "", "| settings | req/s | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for label, cells in sweep.items():
        cell = None if "error" in cells else next(iter(cells.values()))
        lines.append(f"| {label} | {cell['rps']:,.0f} | {cell['latency_ms']['p50']:.2f} | "
                     f"{cell['latency_ms']['p99']:.2f} |" if cell else f"| {label} | not run: {cells['error']} | | |")
    return lines


def markdown(results: dict) -> str:
    sizes = results["sizes"]
    lines = ["# Batched Predict", "", f"`{results['command']}`", "",
             f"{results['model']}; {results['cores']} cores, {results['threads']} torch thread(s) in the one worker of "
             f"each system. Closed-loop clients; each cell {sizes['seconds']:g} s after {sizes['warmup_s']:g} s of "
             f"load, in {sizes['rounds']} round(s) with the systems side by side (the median round shown). mpsd is "
             "called by gRPC (tensors as bytes), LitServe by HTTP with JSON: the transports differ; mpsd's HTTP edge "
             "has no Predict route.", ""]
    if forward := results.get("forward_ms"):
        figures = ", ".join(f"{rows} row(s) {ms:.3f} ms ({ms / int(rows):.3f} ms a row)"
                            for rows, ms in forward.items())
        lines += [f"The model's forward pass alone, in the harness's process with the same threads (median of 20): "
                  f"{figures}.", ""]
    lines += _system_rows(results)
    ratios = [(key, rounds) for key, rounds in results.get("ratios", {}).items() if rounds]
    if ratios:
        lines += ["", f"Ratios at {max(sizes['levels'])} clients, round by round:", ""]
        lines += [f"* {key}: {statistics.median(rounds):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in rounds)})"
                  for key, rounds in ratios]
    lines += _cpu_rows(results)
    for family, sweep in results["sweeps"].items():
        lines += _sweep_rows(results, family, sweep)
    if error := results.get("litserve", {}).get("error"):
        lines += ["", f"LitServe: not run: {error}"]
    elif version := results.get("litserve", {}).get("version"):
        lines += ["", f"LitServe {version}, in its own venv (benchmarks/.peers/litserve)."]
    lines += ["", "| target | value | met |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |"
              for t in targets(results)]
    lines += ["", f"Run took {results.get('elapsed_s', 0):.0f} s."]
    return "\n".join(lines) + "\n"


def write(results: dict, out: pathlib.Path) -> str:
    results["targets"] = targets(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    return text
