"""The engines benchmark's target (the issue's: mpsd at 8 streams keeps >= 0.95 of the engine's own tok/s; reported,
never asserted) and its Markdown report. Pure functions of the results dict."""

from __future__ import annotations

TPS_RATIO = 0.95
TARGET_STREAMS = 8
ROLES = ("engine", "worker", "daemon", "client")


def measured(group: dict) -> dict[str, dict]:
    return group.get("systems", {}) if "error" not in group else {}


def targets(r: dict) -> list[dict]:
    found = []
    level = str(TARGET_STREAMS)
    for key, group in r["engines"].items():
        systems = measured(group)
        for api in ("http", "grpc"):
            name = f"{group.get('engine', key)}: mpsd ({api}, 1 replica) tok/s at {TARGET_STREAMS} streams >= " \
                   f"{TPS_RATIO:.2f}x direct"
            cell = systems.get(f"mpsd-{api}", {}).get("levels", {}).get(level)
            direct = systems.get("direct", {}).get("levels", {}).get(level)
            if cell and direct and cell["ratio_tps"] is not None:
                found.append({"target": name, "value": f"{cell['ratio_tps']:.3f}x ({cell['tps']:.0f} vs "
                                                       f"{direct['tps']:.0f} tok/s, median of "
                                                       f"{len(cell['tps_rounds'])} paired round(s))",
                              "met": cell["ratio_tps"] >= TPS_RATIO})
            else:
                found.append({"target": name, "value": "not measured", "met": None})
    return found


def replicas_ratio(systems: dict, api: str, level: str) -> float | None:
    one = systems.get(f"mpsd-{api}", {}).get("levels", {}).get(level)
    two = systems.get(f"mpsd-2x-{api}", {}).get("levels", {}).get(level)
    return round(two["tps"] / one["tps"], 3) if one and two and one["tps"] else None


def line(name: str, level: str, f: dict) -> str:
    return (f"{name} {level} stream(s): {f['tps']:.0f} tok/s ({f['ratio_tps']:.3f}x direct), TTFT p50 "
            f"{f['ttft_ms']['p50']:.1f} ms, {f['failures']} failed")


def _pause(sizes: dict) -> str:
    jitter = sizes.get("jitter_ms") or 0
    return f", each after a random pause of 0-{jitter:g} ms (seeded: the same for every system)" if jitter else ""


def markdown(r: dict) -> str:
    sizes, model, machine = r["sizes"], r["model"], r["machine"]
    head = (f"Model: **{model['name']}** (MLX: `{model['mlx_dir'] or 'none'}`; torch, as GGUF for llama.cpp: "
            f"`{model['torch_dir']}`). {machine['cores']} cores, {machine['platform']}, Python {machine['python']}. "
            f"`{r.get('command') or 'python -m benchmarks engines'}` took {r.get('elapsed_s', 0):.0f} s.\n\n"
            f"Every system of an engine up at once; streamed `/v1/completions` (direct and mpsd-http: the same client "
            f"and body) or gRPC Generate, greedy, {sizes['max_tokens']} max tokens, 8 fixed prompts (stream i sends "
            f"prompt i mod 8); a cell is N streams at once, each sending {sizes['requests_1']} (1 stream) or "
            f"{sizes['requests_n']} (more) requests one after another"
            f"{_pause(sizes)}; warmed first, then {sizes['rounds']} round(s), "
            f"the systems' order rotated each round. tok/s: completion tokens (usage) over the cell's wall time, "
            f"median round; per-stream: median request's tokens after the first over the time after its first token; "
            f"vs direct: median over rounds of the paired ratio. CPU: each process role's CPU time during the cells "
            f"per 1,000 tokens (client = this benchmark process).")
    parts = [head, _targets(r)]
    for key, group in r["engines"].items():
        parts.append(_group(key, group))
    return "\n\n".join(parts) + "\n"


def _targets(r: dict) -> str:
    rows = ["| target | this run | met |", "|---|---|---|"]
    rows += [f"| {t['target']} | {t['value']} | {'n/a' if t['met'] is None else 'yes' if t['met'] else '**no**'} |"
             for t in r["targets"]]
    return "\n".join(rows)


def _group(key: str, group: dict) -> str:
    title = f"### {group.get('engine', key)}"
    if "error" in group:
        return f"{title}\n\nNot measured: {group['error']}"
    rows = [("| system | streams | TTFT p50 / p99 ms | tok/s (rounds) | per-stream tok/s | tok/s vs direct | "
             "TTFT p50 vs direct | CPU ms per 1k tokens: engine / worker / daemon / client | requests (failed) | "
             "tokens per request | others (cores) |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    systems = group["systems"]
    levels = sorted({level for f in systems.values() for level in f["levels"]}, key=int)
    for level in levels:
        for name, f in systems.items():
            c = f["levels"].get(level)
            if not c:
                continue
            cpu = " / ".join(f"{c['cpu_ms_per_1k_tokens'].get(role, 0):.0f}" if role in c["cpu_ms_per_1k_tokens"]
                             else "–" for role in ROLES)
            rounds = ", ".join(f"{x:.0f}" for x in c["tps_rounds"])
            rows.append(f"| {name} | {level} | {c['ttft_ms']['p50']:.1f} / {c['ttft_ms']['p99']:.1f} | "
                        f"**{c['tps']:.0f}** ({rounds}) | {c['per_stream_tps']:.0f} | {_x(c['ratio_tps'])} | "
                        f"{_x(c['ratio_ttft_p50'])} | {cpu} | {c['requests']} ({c['failures']}) | "
                        f"{c['tokens_per_request'][0]}–{c['tokens_per_request'][1]} | "
                        f"{'n/a' if c['others_cores'] is None else c['others_cores']} |")
    replicas = []
    for level in levels:
        for api in ("http", "grpc"):
            ratio = replicas_ratio(systems, api, level)
            if ratio is not None:
                replicas.append(f"{api} at {level} stream(s) {ratio:.2f}x")
    command = " ".join(group["command"])
    notes = [f"Command (mpsd's `command`; direct: the same with `{{path}}` and `{{port}}` filled): `{command}`, "
             f"path `{group['path']}`, env {group['env']}; {group.get('note', '')}."]
    if replicas:
        notes.append("2 replicas against 1 through mpsd, tok/s: " + "; ".join(replicas) + ".")
    served = {name.removesuffix("-http"): f["requests_by_worker"] for name, f in systems.items()
              if f.get("requests_by_worker") and name.endswith("-http")}
    if served:
        notes.append("Requests each mpsd worker served (warm-up included; a daemon's HTTP and gRPC systems together): "
                     + "; ".join(f"{name} " + ", ".join(f"{w} {n}" for w, n in workers.items())
                                 for name, workers in served.items()) + ".")
    failures = [f"* {name} {level}: {c['failure_examples']}" for name, f in systems.items()
                for level, c in f["levels"].items() if c["failures"]]
    return "\n\n".join([title, "\n".join(rows), *notes, *(["Failures:\n\n" + "\n".join(failures)] if failures
                                                           else [])])


def _x(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}x"
