"""`python -m benchmarks hop`'s load and measurement of one setup, run as a script inside the checkout measured.

benchmarks/hop.py starts this file by path with PYTHONPATH=CODE_ROOT/daemon:
CODE_ROOT and cwd CODE_ROOT, so that the checkout's mpsd (the daemon, and the
worker, which inherits the daemon's PYTHONPATH) and its own harness (daemon_run,
load, sweep, clients) are what run: a checkout from before the Steps stream
measures its own transport with the harness it was written against. So this
file imports only the standard library and what every checkout has, and the
rules that read the samples (hop_buckets.py) stay in the process that started
it. It refuses to run if mpsd comes from anywhere but CODE_ROOT. argv[1] is a
JSON object (see hop.py's _measure); the result is one JSON object on stdout.

Phases, each the same load (STREAMS streams of MAX_TOKENS, as many rounds as
last about SECONDS): "measure", no profiler attached, CPU of daemon and worker
and of each of their threads from /proc, which gives CPU per 1k tokens; then
"profile", the same load with a non-blocking py-spy on each process (sampling
only threads the OS shows running or runnable), whose raw stacks go to
OUT/raw/<setup>-{daemon,worker}.txt, and the CPU read again (py-spy perturbs
it, which its own CPU figure shows).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

PROMPT = "The module provides"
RATE = 100  # py-spy samples per second per process
PROCS = ("daemon", "worker")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def task_cpu(pid: int) -> dict[int, tuple[str, float, float]]:
    """{tid: (comm, utime+stime seconds, stime seconds)}: the kernel's share tells syscalls from Python."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue
        comm = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
        fields = raw.rsplit(b")", 1)[1].split()
        found[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / tick, int(fields[12]) / tick)
    return found


def task_delta(before: dict, after: dict) -> dict[int, tuple[str, float, float]]:
    zero = ("", 0.0, 0.0)
    return {tid: (comm, round(cpu - before.get(tid, zero)[1], 3), round(sys_ - before.get(tid, zero)[2], 3))
            for tid, (comm, cpu, sys_) in after.items()}


def thread_names(py_spy: str, pid: int) -> dict[str, str]:
    """{tid: Python thread name} from one `py-spy dump`, because /proc shows every Python thread as "python"."""
    if not py_spy:
        return {}
    try:
        text = subprocess.run([py_spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return {m[1]: m[2] for m in re.finditer(r'^Thread (\d+) \([^)]*\): "(.*)"$', text, re.M)}


def _ready(daemon) -> None:
    deadline = time.monotonic() + 300
    while True:  # the admin socket may come up a moment after the listening line RunningDaemon waits for
        try:
            daemon.wait_ready(1)
            return
        except Exception as exc:  # noqa: BLE001 - grpc.RpcError while the admin socket is not there yet
            if time.monotonic() > deadline or "admin.sock" not in str(exc):
                raise
            time.sleep(0.5)


def run_setup(spec: dict, log) -> dict:
    from benchmarks import clients
    from benchmarks.daemon_run import RunningDaemon
    from benchmarks.load import run_cell
    from benchmarks.settings import cores, worker_threads
    from benchmarks.sweep import Prompts, lm_config

    name, backend, streams, max_tokens = spec["setup"], spec["backend"], spec["streams"], spec["max_tokens"]
    result: dict = {"setup": name, "label": spec["label"], "backend": backend, "streams": streams,
                    "max_tokens": max_tokens, "concurrency": streams}
    model_dir = ""
    if backend != "null-lm":
        from benchmarks.models import resolve

        model = resolve("demo", log)
        model_dir = model.torch_dir if backend == "torch-lm" else model.mlx_dir
        if not model_dir:
            return {**result, "error": f"{backend}: model not available (mlx-lm missing?)"}
    threads = worker_threads(1, cores())
    result.update(model_dir=model_dir, threads=threads)
    daemon = RunningDaemon(lm_config(1, threads, model_dir, backend, concurrency=streams))
    try:
        _ready(daemon)
        pids = {"daemon": daemon.process.pid, "worker": daemon.status()["workers"][0]["pid"]}
        result.update(daemon_pid=pids["daemon"], worker_pid=pids["worker"])
        prompts = Prompts(PROMPT)
        start = lambda n: (lambda: clients.start_stream(daemon.inference, "bench", prompts.next(), n))  # noqa: E731
        run_cell(start(4), streams)  # warm-up: every batch shape
        calib = run_cell(start(max_tokens), streams)
        rounds = max(1, math.ceil(spec["seconds"] / (max(1, calib["tokens"]) / max(1e-9, calib["tps"]))))
        result["calibration"] = {"tps": calib["tps"], "tokens": calib["tokens"], "seconds": calib["seconds"],
                                 "rounds": rounds, "tokens_per_stream": calib["tokens_per_stream"]}
        log(f"{name}: calibration {calib['tps']:.0f} tok/s, {calib['tokens']} tokens in {calib['seconds']}s "
            f"-> {rounds} rounds")
        load = lambda: run_cell(start(max_tokens), streams, rounds)  # noqa: E731
        result["measure"] = _phase(pids, load, [])
        _log_phase(log, name, "measure", result["measure"])
        result["thread_names"] = {proc: thread_names(spec["py_spy"], pid) for proc, pid in pids.items()}
        if not spec["measure_only"]:
            result["profile"], result["pyspy_command"] = _profiled(spec, pids, load)
            _log_phase(log, name, "profile (py-spy attached)", result["profile"])
        result["status_after"] = {k: daemon.status()["workers"][0].get(k) for k in ("tokens", "requests", "state")}
    finally:
        daemon.stop()
    return result


def _phase(pids: dict, load, spies: list) -> dict:
    tasks_before = {proc: task_cpu(pid) for proc, pid in pids.items()}
    before = {**{proc: cpu_seconds(pid) for proc, pid in pids.items()}, "clients": time.process_time()}
    cell = load()
    after = {**{proc: cpu_seconds(pid) for proc, pid in pids.items()}, "clients": time.process_time()}
    tasks_after = {proc: task_cpu(pid) for proc, pid in pids.items()}
    tokens = max(1, cell["tokens"])
    spent = {k: after[k] - before[k] for k in before}
    return {**{k: cell.get(k) for k in ("tokens", "seconds", "tps", "requests", "failures", "failure_examples",
                                        "tokens_per_stream", "itl_ms", "others_cores")},
            "cpu_s": {k: round(v, 3) for k, v in spent.items()},
            "cpu_ms_per_1k_tokens": {k: round(v / tokens * 1e6, 1) for k, v in spent.items()},
            "pyspy_cpu_s": round(sum(cpu_seconds(p.pid) for p in spies), 3) if spies else None,
            "threads_cpu_s": {proc: task_delta(tasks_before[proc], tasks_after[proc]) for proc in pids}}


def _profiled(spec: dict, pids: dict, load) -> tuple[dict, str]:
    raw = pathlib.Path(spec["out"]) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    spy_args = ["record", "--format", "raw", "--rate", str(RATE), "--threads", "--nonblocking"]
    spies = []
    for proc in PROCS:
        with open(raw / f"{spec['setup']}-{proc}.pyspy.log", "wb") as spy_log:
            spies.append(subprocess.Popen(
                [spec["py_spy"], *spy_args, "-p", str(pids[proc]), "-o", str(raw / f"{spec['setup']}-{proc}.txt")],
                stdout=subprocess.DEVNULL, stderr=spy_log))
    time.sleep(1.0)  # py-spy attaches
    try:
        phase = _phase(pids, load, spies)
    finally:
        for spy in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in spies:
            try:
                spy.wait(60)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
    return phase, " ".join([spec["py_spy"], *spy_args, "-p", "PID", "-o", "FILE"])


def _log_phase(log, name: str, phase: str, figures: dict) -> None:
    cpu = figures["cpu_ms_per_1k_tokens"]
    log(f"{name}: {phase} {figures['tps']:.0f} tok/s, daemon {cpu['daemon']} / worker {cpu['worker']} "
        f"CPU ms per 1k tokens")


def main() -> None:
    spec = json.loads(sys.argv[1])
    import mpsd

    root = pathlib.Path(spec["code_root"])
    if not pathlib.Path(mpsd.__file__).resolve().is_relative_to(root):
        sys.exit(f"mpsd imported from {mpsd.__file__}, not from {root}")
    log = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    log(f"{spec['setup']}: mpsd from {mpsd.__file__}")
    print(json.dumps({**run_setup(spec, log), "mpsd": mpsd.__file__}))


if __name__ == "__main__":
    main()
