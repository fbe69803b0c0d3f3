"""`python -m benchmarks engine_memory`: what two replicas of one GGUF hold, as mpsd counts it and as RSS would.

The issue's question: an engine maps its weights, so RSS charges every replica
for the same page-cache pages while the machine holds them once. This starts a
real mpsd with two replicas of llama-cpp-python's server on one GGUF (the 25M
GPT-2 converted by llama.cpp's converter, ~100 MB of f32 weights, so they stand
out from the interpreter and libraries; `--model demo` for the 3 MB demo), sends
each replica a request so its weights are touched, and reports per worker the
process tree's footprint (what admission counts), RSS, USS, PSS and clean pages,
the model's shared part as status shows it, and the sums two replicas would be
charged by each measure. Needs the llama-cpp extra (`./dev llama-cpp`).
"""

from __future__ import annotations

import json
import os
import pathlib
import time

from benchmarks import multi_turn_peers
from benchmarks.daemon_run import RunningDaemon
from mpsd import paths
from mpsd.demo import gguf_model
from mpsd.demo.models import GGUF_DEMO_FILE
from mpsd.v1 import inference_pb2

MiB = 1 << 20
KINDS = ("footprint_bytes", "rss_bytes", "uss_bytes", "pss_bytes", "clean_bytes")


def gguf_file(model: str, progress) -> pathlib.Path:
    """The GGUF to measure: the demo's, or the 25M GPT-2 converted once, as multi_turn's llama-cpp peer has it."""
    if model == "demo":
        out = paths.gguf_demo_model_dir()
        gguf_model.build_gguf_demo_model(out, progress=progress)
        file = out / GGUF_DEMO_FILE
    else:
        from mpsd.demo.gpt2_25m import build_gpt2_25m

        source = build_gpt2_25m(tokenizer_dir=paths.demo_model_dir(), progress=progress)
        file = multi_turn_peers.gguf_file(str(source), progress)
    os.sync()  # a file just written is dirty in the page cache, and dirty mapped pages count as held until written
    return file


def config(file: pathlib.Path, replicas: int) -> str:
    return f"""
[daemon]
health_interval = "0.5s"

[[models]]
name = "gguf"
path = "{file}"
replicas = {replicas}
env = {{ OMP_NUM_THREADS = "1" }}
"""


def measure(file: pathlib.Path, replicas: int, progress) -> dict:
    daemon = RunningDaemon(config(file, replicas))
    try:
        admin = paths.admin_socket_path(daemon.dir / "state")
        deadline = time.monotonic() + 30
        while not admin.exists() and time.monotonic() < deadline:  # bound a moment after the public port
            time.sleep(0.1)
        daemon.wait_ready(replicas, timeout=180)
        for _ in range(replicas * 2):  # least-loaded spreads them: every replica runs its weights at least once
            list(daemon.inference.Generate(inference_pb2.GenerateRequest(
                model="gguf", prompt="The module provides", max_tokens=8, temperature=0), timeout=60))
        time.sleep(11)  # the daemon reads a large tree's smaps at most every 10 s: let it read after the requests
        status = daemon.status()
    finally:
        daemon.stop()
    model = next(m for m in status["models"] if m["name"] == "gguf")
    workers = {w["id"]: {k: int(w["process_memory"][k]) for k in (*KINDS, "processes")}
               for w in status["workers"] if w["model"] == "gguf"}
    progress(f"{replicas} replica(s): {json.dumps(workers)}")
    return {"replicas": replicas, "workers": workers, "shared_bytes": int(model["shared_bytes"]),
            "shared_by": int(model["shared_by"]), "footprint_source": model.get("footprint_source", ""),
            "footprint_bytes": int(model.get("footprint_bytes", 0))}


def report(file: pathlib.Path, runs: list[dict], command: str) -> str:
    size = file.stat().st_size
    lines = [f"# Two replicas of one GGUF: what each measure charges them", "",
             f"`{command}`: `{file.name}` ({size / MiB:.1f} MiB) served by llama-cpp-python's server under mpsd, "
             "each worker's process tree (worker, guard, engine) as status reports it, after a request on each.", "",
             "| replicas | worker | footprint (admission) | RSS | USS | PSS | clean pages | processes |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for worker, m in sorted(run["workers"].items()):
            lines.append(f"| {run['replicas']} | {worker} | " + " | ".join(f"{m[k] / MiB:.1f} MiB" for k in KINDS)
                         + f" | {m['processes']} |")
    lines += ["", "| replicas | Σ footprint | Σ RSS | Σ USS | Σ PSS | shared, shown once |", "|---|---|---|---|---|---|"]
    for run in runs:
        sums = {k: sum(m[k] for m in run["workers"].values()) for k in KINDS}
        lines.append(f"| {run['replicas']} | " + " | ".join(f"{sums[k] / MiB:.1f} MiB" for k in KINDS[:4])
                     + f" | {run['shared_bytes'] / MiB:.1f} MiB by {run['shared_by']} |")
    return "\n".join(lines) + "\n"


def run(model: str, out: pathlib.Path, command: str, progress) -> str:
    file = gguf_file(model, progress)
    runs = [measure(file, replicas, progress) for replicas in (1, 2)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"command": command, "gguf": str(file),
                                                  "gguf_bytes": file.stat().st_size, "runs": runs}, indent=2))
    text = report(file, runs, command)
    (out / "results.md").write_text(text)
    return text
