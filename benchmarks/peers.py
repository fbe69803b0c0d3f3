"""Peer servers (Ray Serve, LitServe) under the same sweep as mpsd, at their best batching settings.

Each peer runs mpsd's own batched engine (TorchCausalLM) in every replica,
continuously batched (see peer_servers/*.py for why that is each one's best),
so only the serving layer differs. Each lives in its own virtual environment
under benchmarks/.peers/ (peer_install.py). Every system gets the same torch
threads per replica as mpsd gives a worker, and the same batch size.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from benchmarks import http_streams
from benchmarks.peer_install import PEERS_DIR, PeerError, ensure_venv, venv_python
from benchmarks.servers import ServerProcess
from benchmarks.settings import Settings, cores, worker_threads
from benchmarks.sweep import measure_row, row_line

PEERS = ("ray-serve", "litserve")
SERVERS_DIR = PEERS_DIR.parent / "peer_servers"


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    packages: tuple[str, ...]   # beyond the torch and transformers every peer venv gets
    dist: str                   # whose version is reported
    script: str                 # under peer_servers/
    path: str                   # the streaming endpoint
    batching: str               # what the report says about its settings


PEER_SPECS = {
    "ray-serve": Peer("ray-serve", ("ray[serve]==2.60.0",), "ray", "ray_serve_app.py", "/generate",
                      "N replicas, max_ongoing_requests = 256, each running mpsd's DecodeScheduler (max {c} "
                      "sequences, the rest queued in order) over TorchCausalLM"),
    "litserve": Peer("litserve", ("litserve==0.2.19",), "litserve", "litserve_app.py", "/predict",
                     "workers_per_device = N, ContinuousBatchingLoop (idle pass sleeps 1 ms) with max_batch_size = "
                     "{c}, step() = one TorchCausalLM step; excess waits in the LitAPI, first come first served"),
}


def run_peers(settings: Settings, model_dir: str, progress: Callable[[str], None]) -> dict:
    """Every peer: {"rows": {replicas: cells}, "version", ...}, or {"error": why}. Never raises."""
    results = {}
    for name in PEERS:
        try:
            results[name] = run_peer(PEER_SPECS[name], settings, model_dir, progress)
        except PeerError as exc:
            results[name] = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a figure, not a crash of the benchmark
            results[name] = {"error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"}
        if "error" in results[name]:
            progress(f"{name}: not run: {results[name]['error']}")
    return results


def run_peer(peer: Peer, settings: Settings, model_dir: str, progress) -> dict:
    version, install_s = ensure_venv(peer.name, peer.packages, peer.dist, progress)
    rows: dict[str, list[dict]] = {}
    starts: list[float] = []
    for replicas in settings.worker_counts:
        threads = worker_threads(replicas, cores())
        progress(f"{peer.name}: {replicas} replica(s) x {threads} thread(s), batch {settings.concurrency}")
        server = start_server(peer, model_dir, replicas, threads, settings.concurrency)
        try:
            starts.append(round(server.start_to_ready_s, 3))
            start = lambda prompt, n: http_streams.start_ndjson(server.port, peer.path, prompt, n)  # noqa: E731
            rows[str(replicas)] = measure_row(start, settings, settings.stream_levels, settings.max_tokens,
                                              replicas * settings.concurrency)
        finally:
            server.stop()
            if server.stop_report.get("killed_after_grace") or server.stop_report.get("outside_session"):
                progress(f"{peer.name}: stopped; {server.stop_report}")
        progress(f"{peer.name}: {replicas} replica(s): " + row_line(rows[str(replicas)]))
    return {"rows": rows, "version": version, "install_s": round(install_s, 1), "start_to_ready_s": starts,
            "batching": peer.batching.format(c=settings.concurrency)}


def start_server(peer: Peer, model_dir: str, replicas: int, threads: int, concurrency: int) -> ServerProcess:
    command = [str(venv_python(peer.name)), str(SERVERS_DIR / peer.script), "--model-dir", model_dir,
               "--replicas", str(replicas), "--threads", str(threads), "--concurrency", str(concurrency)]
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    log_path = PEERS_DIR / peer.name / f"server-{replicas}.log"
    if peer.name == "ray-serve":
        command += ["--temp-dir", "{temp_dir}", "--cpus", str(cores())]
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return ServerProcess(peer.name, command, log_path, env, ready_line=b"PEER READY",
                             cleanup=(str(PEERS_DIR / peer.name / "bin" / "ray"), "stop", "--force"))
    return ServerProcess(peer.name, command, log_path, env)
