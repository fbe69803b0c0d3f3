"""`python -m benchmarks hop`'s summary.md: the setups side by side, one column each, one table per view.

Rows are the union of every setup's buckets in first-seen order, so a
bucket one transport has and the other lacks still lines up when a before
and an after summary are read together. Frames no rule matched are listed at
the end, because a large "other" means the rules (hop_buckets.py) missed a
part of the code and the tables above it undercount something.
"""

from __future__ import annotations

OTHER_FRAMES = 5  # innermost-frame lines listed per process for the "other" bucket


def _table(results: list[dict], rows: list[str], cell) -> list[str]:
    lines = ["| | " + " | ".join(r["setup"] for r in results) + " |", "|---|" + "---|" * len(results)]
    return lines + [f"| {row} | " + " | ".join(cell(r, row) for r in results) + " |" for row in rows]


def _ordered(results: list[dict], get) -> list[str]:
    keys: list[str] = []
    for r in results:
        keys += [k for k in get(r) or {} if k not in keys]
    return keys


def _view(results: list[dict], title: str, get) -> list[str]:
    """One table: title, then a row per key of get(result), a column per setup."""
    return ["", title, ""] + _table(results, _ordered(results, get), lambda r, k: str((get(r) or {}).get(k, 0.0)))


def _headline(r: dict) -> str:
    if "error" in r:
        return f"| {r['setup']} {r['label']} | failed: {r['error']} |"
    m, p = r.get("measure") or {}, r.get("profile") or {}
    c, pc = m.get("cpu_ms_per_1k_tokens", {}), p.get("cpu_ms_per_1k_tokens", {})
    return (f"| {r['setup']} {r['label']} | {m.get('tps', '-')} | {c.get('daemon', '-')} | {c.get('worker', '-')} | "
            f"{c.get('clients', '-')} | {p.get('tps', '-')}, {pc.get('daemon', '-')}, {pc.get('worker', '-')} | "
            f"{p.get('pyspy_cpu_s', '-')} / {p.get('seconds', '-')} | {m.get('tokens_per_stream')} |")


def summary_md(results: list[dict]) -> str:
    lines = ["| setup | tok/s | daemon CPU ms/1k tok | worker CPU ms/1k tok | clients CPU ms/1k tok | "
             "tok/s, daemon, worker ms/1k with py-spy attached | py-spy CPU s / load s | tokens/stream |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_headline(r) for r in results]
    ok = [r for r in results if "error" not in r]
    for proc in ("worker", "daemon"):
        lines += _view(ok, f"**{proc}: CPU ms per 1k tokens by thread (/proc/PID/task, unprofiled phase)**",
                       lambda r: r["measure"].get("cpu_ms_per_1k_by_thread_group", {}).get(proc))
        profiled = [r for r in ok if "samples" in r.get(f"{proc}_profile", {})]
        if not profiled:
            continue
        prof = lambda r: r[f"{proc}_profile"]  # noqa: E731
        lines += _view(profiled, f"**{proc}: % of non-idle py-spy samples (Python threads only)**",
                       lambda r: prof(r)["percent_of_busy"])
        lines.append("| (non-idle / idle-loop samples) | " + " | ".join(
            f"{prof(r)['busy_samples']} / {prof(r)['idle_samples']}" for r in profiled) + " |")
        lines += _view(profiled, f"**{proc}: % of process CPU (each thread's /proc CPU split by its samples; "
                                 "native threads whole)**", lambda r: prof(r)["cpu_weighted"]["percent_of_cpu"])
    return "\n".join(lines + _unmatched(ok)) + "\n"


def _unmatched(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        for proc in ("worker", "daemon"):
            frames = r.get(f"{proc}_profile", {}).get("top_frames", {}).get("other")
            if frames:
                lines += ["", f"*{r['setup']} {proc}: innermost frames of samples no rule matched (\"other\")*", ""]
                lines += [f"- {count} x `{frame}`" for frame, count in frames[:OTHER_FRAMES]]
    return lines
