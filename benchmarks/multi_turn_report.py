"""The multi-turn benchmark's targets (issue 22: reported, never asserted) and its Markdown report.

Pure functions of the results dict, so the report and the docs read one judgement.
"""

from __future__ import annotations

TTFT_GAIN = 5.0          # turns >= 3, TTFT p50 with the cache off over on (the 25M model)
ROUTED_HIT_RATE = 0.90   # turns >= 2, 2 replicas, prefix-aware routing
NO_REUSE_LOSS = 0.03     # tok/s lost to the cache when nothing hits

SYSTEM_NOTES = {
    "mpsd-torch": "torch-lm, 1 worker, prefix_cache default (25%)",
    "mpsd-torch-no-cache": "torch-lm, 1 worker, prefix_cache = \"0\"",
    "mpsd-torch-2x-prefix": "torch-lm, 2 workers, routing = \"prefix\"",
    "mpsd-torch-2x-least-loaded": "torch-lm, 2 workers, routing = \"least-loaded\"",
    "mpsd-mlx": "mlx-lm, 1 worker, prefix_cache default (25%)",
}


def _system_note(name: str, prefix_cache: str | None) -> str | None:
    """An mpsd system's settings as the run used them (--prefix-cache replaces the default)."""
    note = SYSTEM_NOTES.get(name)
    if note and prefix_cache and name != "mpsd-torch-no-cache":
        note = note.replace("prefix_cache default (25%)", f'prefix_cache = "{prefix_cache}"')
        note += "" if "prefix_cache" in note else f', prefix_cache = "{prefix_cache}"'
    return note


def line(f: dict) -> str:
    """One system's figures on one line, for the progress log."""
    return (f"{f['requests']} requests ({f['failures']} failed), TTFT p50 turn 1 {f['ttft_ms_turn1']['p50']:.0f} ms,"
            f" turns>=3 {f['ttft_ms_turns_ge3']['p50']:.0f} ms (p99 {f['ttft_ms_turns_ge3']['p99']:.0f}), hit rate "
            f"turns>=2 {_pct(f['hit_rate_turns_ge2'])}, prompt {f['prompt_tps']:.0f} tok/s, {f['tps']:.0f} tok/s, "
            f"longest prompt {f['prompt_tokens_max']} tokens")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _measured(systems: dict, name: str) -> dict | None:
    figures = systems.get(name)
    return figures if figures and "error" not in figures and figures["requests"] > figures["failures"] else None


def _target(name: str, value: str, met: bool | None) -> dict:
    return {"target": name, "value": value, "met": met}


def targets(r: dict) -> list[dict]:
    s = r["systems"]
    found = []
    on, off = _measured(s, "mpsd-torch"), _measured(s, "mpsd-torch-no-cache")
    name = f"turns>=3 TTFT p50 >= {TTFT_GAIN:.0f}x lower, cache on vs off ({r['model']['name']})"
    if on and off and on["ttft_ms_turns_ge3"]["p50"]:
        gain = off["ttft_ms_turns_ge3"]["p50"] / on["ttft_ms_turns_ge3"]["p50"]
        found.append(_target(name, f"{gain:.2f}x ({on['ttft_ms_turns_ge3']['p50']:.0f} vs "
                                   f"{off['ttft_ms_turns_ge3']['p50']:.0f} ms)", gain >= TTFT_GAIN))
    else:
        found.append(_target(name, "not measured", None))
    prefix, least = _measured(s, "mpsd-torch-2x-prefix"), _measured(s, "mpsd-torch-2x-least-loaded")
    name = f"hit rate >= {ROUTED_HIT_RATE:.0%} at turns>=2, 2 replicas, routing = \"prefix\""
    if prefix and prefix["hit_rate_turns_ge2"] is not None:
        other = f"; least-loaded {_pct(least['hit_rate_turns_ge2'])}" if least else ""
        found.append(_target(name, f"{_pct(prefix['hit_rate_turns_ge2'])}{other}",
                             prefix["hit_rate_turns_ge2"] >= ROUTED_HIT_RATE))
    else:
        found.append(_target(name, "not measured", None))
    ours, theirs = _measured(s, "mpsd-mlx"), _measured(s, "mlx_lm.server")
    name = "MLX multi-turn TTFT p50 (turns>=2) <= mlx_lm.server's"
    if ours and theirs:
        a, b = ours["ttft_ms_turns_ge2"], theirs["ttft_ms_turns_ge2"]
        found.append(_target(name, f"{a['p50']:.0f} vs {b['p50']:.0f} ms (p99 {a['p99']:.0f} vs {b['p99']:.0f})",
                             a["p50"] <= b["p50"]))
    else:
        found.append(_target(name, "not measured", None))
    nr = r.get("no_reuse") or {}
    name = f"no reuse: tok/s lost to the cache <= {NO_REUSE_LOSS:.0%}"
    if nr.get("loss") is not None:
        found.append(_target(name, f"{nr['loss'] * 100:.1f}% ({nr['tps_on']:.0f} on vs {nr['tps_off']:.0f} off "
                                   f"tok/s, median of {len(nr['rounds']['on'])} round(s))", nr["loss"] <= NO_REUSE_LOSS))
    else:
        found.append(_target(name, "not measured", None))
    return found


def markdown(r: dict) -> str:
    sizes, model, machine = r["sizes"], r["model"], r["machine"]
    head = (f"Model: **{model['name']}** (torch: `{model['torch_dir']}`; MLX: `{model['mlx_dir'] or 'none'}`). "
            f"{machine['cores']} cores, {machine['platform']}, Python {machine['python']}. "
            f"`{r.get('command') or 'python -m benchmarks multi_turn'}` took {r.get('elapsed_s', 0):.0f} s.\n\n"
            f"{sizes['conversations']} conversations at once, {sizes['turns']} turns each, {sizes['max_tokens']} "
            f"tokens per reply, greedy, streamed /v1/completions; hit rate = cached / prompt tokens at turns >= 2.")
    return "\n\n".join([head, _targets(r), _systems(r), _turns(r), _no_reuse(r), _caches(r), _errors(r)]) + "\n"


def _targets(r: dict) -> str:
    rows = ["| target | this run | met |", "|---|---|---|"]
    rows += [f"| {t['target']} | {t['value']} | {'n/a' if t['met'] is None else 'yes' if t['met'] else '**no**'} |"
             for t in r["targets"]]
    return "\n".join(rows)


def _systems(r: dict) -> str:
    rows = [("| system | requests (failed) | TTFT p50 turn 1 ms | TTFT p50 / p99 turns>=2 ms | TTFT p50 / p99 "
             "turns>=3 ms | hit rate turns>=2 | prompt tok/s | tok/s | longest prompt | others (cores) |"),
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, f in r["systems"].items():
        if "error" in f:
            continue
        g2, g3 = f["ttft_ms_turns_ge2"], f["ttft_ms_turns_ge3"]
        rows.append(f"| {name} | {f['requests']} ({f['failures']}) | {f['ttft_ms_turn1']['p50']:.0f} | "
                    f"{g2['p50']:.0f} / {g2['p99']:.0f} | {g3['p50']:.0f} / {g3['p99']:.0f} | "
                    f"{_pct(f['hit_rate_turns_ge2'])} | {f['prompt_tps']:.0f} | {f['tps']:.0f} | "
                    f"{f['prompt_tokens_max']} | {f['others_cores'] if f['others_cores'] is not None else 'n/a'} |")
    cache = r["sizes"].get("prefix_cache")
    notes = [f"* **{name}**: {_system_note(name, cache) or _peer_note(f)}"
             + (f"; replies equal to the cache-off run's: {f['replies_same_as_no_cache']}"
                if "replies_same_as_no_cache" in f else "")
             for name, f in r["systems"].items() if "error" not in f]
    return "\n".join(rows) + "\n\n" + "\n".join(notes)


def _peer_note(f: dict) -> str:
    parts = [f"version {f.get('version', '?')}", f"`{f.get('settings', '')}`"]
    if f.get("install_s"):
        parts.append(f"installed in {f['install_s']:.0f} s")
    if f.get("start_to_ready_s") is not None:
        parts.append(f"ready in {f['start_to_ready_s']:.1f} s")
    if f.get("cached_tokens_from"):
        parts.append(f"cached tokens from {f['cached_tokens_from']}")
    if f.get("model"):
        parts.append(f"model {f['model']}")
    return ", ".join(parts)


def _turns(r: dict) -> str:
    measured = {n: f for n, f in r["systems"].items() if "error" not in f}
    turns = range(1, r["sizes"]["turns"] + 1)
    rows = ["TTFT p50 / p99 (ms) by turn, and the mean prompt tokens of that turn (first row).\n",
            "| system | " + " | ".join(f"turn {t}" for t in turns) + " |", "|---|" + "---|" * len(turns)]
    first = next(iter(measured.values()), None)
    if first:
        rows.append("| prompt tokens | " + " | ".join(str(first["per_turn"].get(str(t), {}).get("prompt_tokens", ""))
                                                    for t in turns) + " |")
    for name, f in measured.items():
        cells = [f["per_turn"].get(str(t)) for t in turns]
        rows.append(f"| {name} | " + " | ".join(
            f"{c['ttft_ms']['p50']:.0f} / {c['ttft_ms']['p99']:.0f}" if c else "" for c in cells) + " |")
    return "\n".join(rows)


def _no_reuse(r: dict) -> str:
    nr = r.get("no_reuse") or {}
    if not nr.get("rounds"):
        return f"No-reuse load: not measured ({nr.get('error', 'not run')})."
    rows = [("No-reuse load (random prompts of the same lengths, nothing shared), mpsd torch-lm cache on vs off, "
             "rounds alternated:\n"), "| cache | tok/s by round | prompt tok/s by round | hit rate | failed |",
            "|---|---|---|---|---|"]
    for key in ("on", "off"):
        rounds = nr["rounds"][key]
        tps = ", ".join(f"{x['tps']:.0f}" for x in rounds)
        prompt = ", ".join(f"{x['prompt_tps']:.0f}" for x in rounds)
        hits = ", ".join(_pct(x["hit_rate_turns_ge2"]) for x in rounds)
        rows.append(f"| {key} | {tps} | {prompt} | {hits} | {sum(x['failures'] for x in rounds)} |")
    return "\n".join(rows)


def _caches(r: dict) -> str:
    rows = [("mpsd workers' prefix caches after the multi-turn run (as `mpsctl status` shows them), and the prompt "
             "tokens each worker served from its cache (hit) and prefilled (miss) during the run:\n"),
            ("| system | worker | bytes | budget | entries | run: hit tokens | run: miss tokens | run: share of prompt "
             "tokens | run: evictions |"), "|---|---|---|---|---|---|---|---|---|"]
    for name, f in r["systems"].items():
        workers = f.get("cache", [])
        total = sum(w.get("run_hit_tokens", 0) + w.get("run_miss_tokens", 0) for w in workers)
        for w in workers:
            served = w.get("run_hit_tokens", 0) + w.get("run_miss_tokens", 0)
            rows.append(f"| {name} | {w['worker']} | {_mib(w.get('bytes'))} | {_mib(w.get('budget_bytes'))} | "
                        f"{w.get('entries', 0)} | {w.get('run_hit_tokens', 0)} | {w.get('run_miss_tokens', 0)} | "
                        f"{_pct(served / total if total else None)} | {w.get('run_evictions', 0)} |")
    return "\n".join(rows)


def _mib(value) -> str:
    return f"{int(value or 0) / (1 << 20):.1f} MiB"


def _errors(r: dict) -> str:
    errors = [f"* **{name}**: {f['error']}" for name, f in r["systems"].items() if "error" in f]
    return "Not measured:\n\n" + "\n".join(errors) if errors else ""
