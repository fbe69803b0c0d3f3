"""`python -m benchmarks hop`: where the CPU goes per token in the worker -> daemon -> client hop.

The hop's cost is spread over threads that /proc alone cannot tell apart
(grpc's pools, the decode loop, the daemon's event loop), so each setup runs
the same load twice: unprofiled, for CPU per 1,000 tokens by process and by
thread, then under py-spy, whose samples hop_buckets.py sorts into the hop's
parts. The "% of process CPU" view spreads each thread's /proc CPU over its
samples, because a non-blocking py-spy also samples threads that are runnable
but waiting for one of the two cores.

Setups: one daemon, one worker with the harness's default threads, STREAMS
streams at once, greedy, every prompt distinct:
  A  null-lm (zero compute): the transport alone
  B  torch-lm on mpsd's demo GPT-2
  C  mlx-lm on mpsd's MLX demo llama

--code-root measures another checkout (a worktree of an earlier commit) from
this one, so before and after are one command each: the load runs in a child
with that checkout's mpsd and harness (hop_measure.py says why), and the
rules that read the samples are this checkout's, which know both transports.
A whole re-exec would not do: `python -m benchmarks` under an older checkout's
path is that checkout's benchmarks, which has no hop. Results of setups not
run this time are kept from OUT/results.json, so setups can be run one per
invocation.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from benchmarks import hop_buckets, hop_report

SETUPS = {"A": ("null-lm", "null-lm (zero compute)"), "B": ("torch-lm", "torch-lm demo GPT-2"),
          "C": ("mlx-lm", "mlx-lm demo llama")}
FALLBACK_PY_SPY = "/tmp/spy/bin/py-spy"
MEASURE = pathlib.Path(__file__).with_name("hop_measure.py")


def py_spy() -> str:
    """PY_SPY, else py-spy on PATH, else FALLBACK_PY_SPY, which may not be there."""
    return os.environ.get("PY_SPY") or shutil.which("py-spy") or FALLBACK_PY_SPY


def run(setups: list[str], seconds: float, streams: int, max_tokens: int, measure_only: bool, out: pathlib.Path,
        code_root: pathlib.Path, command: str, progress) -> str:
    """Runs the setups, writes OUT/results.json and OUT/summary.md; returns the summary."""
    root, out = code_root.resolve(), out.resolve()
    spy = py_spy()
    if not os.access(spy, os.X_OK):
        if not measure_only:
            progress(f"no py-spy at {spy} (set PY_SPY or put py-spy on PATH): the profile phase is skipped, "
                     "as with --measure-only")
        spy, measure_only = "", True
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    previous = json.loads(results_path.read_text())["results"] if results_path.is_file() else []
    results = {r["setup"]: r for r in previous if r["setup"] not in setups}
    rules = hop_buckets.Rules(root)
    for name in setups:
        backend, label = SETUPS[name]
        spec = {"setup": name, "backend": backend, "label": label, "seconds": seconds, "streams": streams,
                "max_tokens": max_tokens, "measure_only": measure_only, "out": str(out), "code_root": str(root),
                "py_spy": spy}
        result = _measure(spec, root)
        if "error" not in result:
            _add_profiles(result, rules, {proc: out / "raw" / f"{name}-{proc}.txt" for proc in ("daemon", "worker")})
        else:
            progress(f"{name}: failed: {result['error']}")
        results[name] = result
        _write(results_path, root, command, results)
    summary = hop_report.summary_md([results[k] for k in sorted(results)])
    (out / "summary.md").write_text(f"`{command}` (code root {root})\n\n{summary}")
    return summary


def _measure(spec: dict, root: pathlib.Path) -> dict:
    """One setup in a child that runs CODE_ROOT's mpsd and harness (its log lines go to this stderr)."""
    env = dict(os.environ, PYTHONPATH=f"{root / 'daemon'}{os.pathsep}{root}")
    # -P: the script's folder (this benchmarks/) is not put first on the path, where it would shadow CODE_ROOT's
    done = subprocess.run([sys.executable, "-P", str(MEASURE), json.dumps(spec)], cwd=root, env=env,
                          stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        return {"setup": spec["setup"], "label": spec["label"],
                "error": f"the measuring child exited with {done.returncode} (its stderr is above)"}
    return json.loads(lines[-1])


def _write(path: pathlib.Path, root: pathlib.Path, command: str, results: dict) -> None:
    path.write_text(json.dumps({"command": command, "code_root": str(root), "written": time.strftime("%Y-%m-%d %H:%M"),
                                "results": [results[k] for k in sorted(results)]}, indent=1))


def _add_profiles(result: dict, rules: hop_buckets.Rules, files: dict[str, pathlib.Path]) -> None:
    """Buckets from the raw files and CPU by bucket (profile phase); CPU by thread group per 1k tokens (each phase)."""
    profile_names: dict = {}
    for proc, path in (files if "profile" in result else {}).items():
        if not (path.is_file() and path.stat().st_size):
            result[f"{proc}_profile"] = {"error": f"py-spy wrote no {path.name}"}
            continue
        profile = hop_buckets.bucketize(rules, proc, path)
        profile["cpu_weighted"] = hop_buckets.cpu_weighted(profile, result["profile"]["threads_cpu_s"][proc],
                                                           result["backend"])
        result[f"{proc}_profile"] = profile
        profile_names[proc] = profile["tid_names"]
    for proc in ("daemon", "worker"):
        names = {**result.get("thread_names", {}).get(proc, {}), **profile_names.get(proc, {})}
        for phase in ("measure", "profile"):
            if phase not in result:
                continue
            groups: collections.Counter = collections.Counter()
            kernel: collections.Counter = collections.Counter()
            for tid, (comm, cpu, sys_) in result[phase]["threads_cpu_s"][proc].items():
                group = hop_buckets.thread_group(names.get(str(tid), ""), comm, result["backend"])
                groups[group] += cpu
                kernel[group] += sys_
            tokens = max(1, result[phase]["tokens"])
            result[phase].setdefault("cpu_ms_per_1k_by_thread_group", {})[proc] = {
                k: round(v / tokens * 1e6, 1) for k, v in groups.most_common() if v > 0}
            result[phase].setdefault("kernel_share_by_thread_group", {})[proc] = {
                k: round(kernel[k] / v, 2) for k, v in groups.most_common() if v > 0}
