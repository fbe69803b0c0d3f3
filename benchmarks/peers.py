"""Peer servers (Ray Serve, LitServe) under the same load as mpsd.

Each peer serves the same model through mpsd's own decode loop
(mpsd.worker.backends.torch_lm.TorchCausalLM), so only the serving layer
differs. Each lives in its own virtual environment under benchmarks/.peers/,
built here on first use and reused while its marker file matches.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import http.client
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Callable, Iterator

from benchmarks import processes, timing
from benchmarks.settings import cores, worker_threads
from benchmarks.timing import StreamTiming, percentiles_ms, time_tokens

PEERS = ("ray-serve", "litserve")

HERE = pathlib.Path(__file__).resolve().parent
PROJECT = HERE.parent
PEERS_DIR = HERE / ".peers"
SERVERS_DIR = HERE / "peer_servers"
CONSTRAINTS = PROJECT / "constraints.txt"

BASE_PACKAGES = ("torch==2.13.0", "transformers==5.23.0")
INSTALL_TIMEOUT_S = 600
START_TIMEOUT_S = 180
STOP_GRACE_S = 20
REQUEST_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Peer:
    name: str
    packages: tuple[str, ...]   # beyond BASE_PACKAGES
    dist: str                   # whose version is reported
    script: str                 # under peer_servers/
    path: str                   # the streaming endpoint


PEER_SPECS = {
    "ray-serve": Peer("ray-serve", ("ray[serve]==2.60.0",), "ray", "ray_serve_app.py", "/generate"),
    "litserve": Peer("litserve", ("litserve==0.2.19",), "litserve", "litserve_app.py", "/predict"),
}


class PeerError(Exception):
    """One sentence: why this peer has no figures."""


# --- install ---------------------------------------------------------------------------------------

def venv_python(name: str) -> pathlib.Path:
    return PEERS_DIR / name / "bin" / "python"


def _install_spec(peer: Peer) -> dict:
    return {"packages": [*BASE_PACKAGES, *peer.packages], "constraints": CONSTRAINTS.read_text(),
            "python": sys.version.split()[0], "project": str(PROJECT)}


def ensure_venv(peer: Peer, progress) -> tuple[str, float]:
    """(installed version of the peer, seconds spent installing: 0 when reused). Raises PeerError."""
    root = PEERS_DIR / peer.name
    marker = root / ".mpsd-peer-installed.json"
    spec = _install_spec(peer)
    if marker.is_file() and venv_python(peer.name).exists():
        try:
            recorded = json.loads(marker.read_text())
        except ValueError:
            recorded = {}
        if recorded.get("spec") == spec:
            progress(f"{peer.name}: reusing {root} ({peer.dist} {recorded['version']})")
            return recorded["version"], 0.0
    progress(f"{peer.name}: installing {' '.join(spec['packages'])} into {root} (first use; up to "
             f"{INSTALL_TIMEOUT_S // 60} min)")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log = root / "install.log"
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    started = time.perf_counter()
    python = str(venv_python(peer.name))
    steps = [
        ("creating the venv", [_base_python(), "-m", "venv", str(root)]),
        ("pip install", [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                         "-c", str(CONSTRAINTS), *spec["packages"]]),
        ("pip install -e mpsd", [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
                                 "--no-deps", "-e", str(PROJECT)]),
    ]
    with open(log, "ab") as out:
        for what, command in steps:
            out.write(f"\n$ {' '.join(command)}\n".encode())
            out.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"install took over {INSTALL_TIMEOUT_S}s ({what} not reached)")
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=str(root))
            try:
                code = process.wait(left)
            except subprocess.TimeoutExpired:
                processes.kill_group(process.pid, 0)
                raise PeerError(f"install timed out after {INSTALL_TIMEOUT_S}s during {what} (log: {log})") from None
            if code != 0:
                raise PeerError(f"{what} failed: {_last_line(log)}")
    version = _dist_version(python, peer.dist)
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"spec": spec, "version": version, "install_s": round(seconds, 1)}, indent=1))
    progress(f"{peer.name}: installed {peer.dist} {version} in {seconds:.0f}s")
    return version, seconds


def _base_python() -> str:
    """The interpreter to make peer venvs from: this one's base, so a venv is not nested in a venv."""
    base = pathlib.Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else sys.executable


def _dist_version(python: str, dist: str) -> str:
    result = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise PeerError(f"{dist} is not importable after install: {_last_text_line(result.stderr)}")
    return result.stdout.strip()


def _last_line(path: pathlib.Path) -> str:
    try:
        return _last_text_line(path.read_text(errors="replace")) or f"(no output; see {path})"
    except OSError:
        return f"(no log at {path})"


def _last_text_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1][:400]


# --- one server ----------------------------------------------------------------------------------

class PeerServer:
    """One peer server in its own session, answering on 127.0.0.1, ended with everything it started."""

    def __init__(self, peer: Peer, model_dir: str, replicas: int, threads: int, n_cores: int) -> None:
        self.peer = peer
        self.replicas = replicas
        self.port = _free_port()
        self.tag = uuid.uuid4().hex
        self.temp_dir = pathlib.Path(tempfile.mkdtemp(prefix="mpsd-peer-"))
        self.log_path = PEERS_DIR / peer.name / f"server-{replicas}.log"
        command = [str(venv_python(peer.name)), str(SERVERS_DIR / peer.script), "--model-dir", model_dir,
                   "--replicas", str(replicas), "--threads", str(threads), "--port", str(self.port)]
        if peer.name == "ray-serve":
            command += ["--temp-dir", str(self.temp_dir), "--cpus", str(n_cores)]
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
        env.update({processes.TAG_VARIABLE: self.tag, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                    "TMPDIR": str(self.temp_dir)})
        self._log = open(self.log_path, "wb")
        started = time.perf_counter()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, cwd=str(self.temp_dir), start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_to_ready_s = time.perf_counter() - started

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise PeerError(f"the server exited with code {code} before it was ready: {self.last_log_line()}")
            if _health(self.port) and (self.peer.name != "ray-serve" or b"PEER READY" in self.log_path.read_bytes()):
                return
            time.sleep(0.5)
        raise PeerError(f"the server was not ready within {START_TIMEOUT_S}s ({self.replicas} replica(s)): "
                        f"{self.last_log_line()}")

    def last_log_line(self) -> str:
        try:
            text = ANSI.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return "(no log)"
        return _last_text_line(text) or "(empty log)"

    def stream(self, prompt: str, max_tokens: int) -> "StreamTiming":
        return timed_stream(self.port, self.peer.path, prompt, max_tokens)

    def stop(self) -> None:
        """SIGTERM to every process of the server's session, SIGKILL after a grace, then any process that
        carries this run's tag (in case one left the session), and check that none is left."""
        self.stop_report = {}
        left = processes.end_session(self.process.pid, STOP_GRACE_S)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        strays = processes.kill_tagged(self.tag)
        if strays and self.peer.name == "ray-serve":
            subprocess.run([str(PEERS_DIR / self.peer.name / "bin" / "ray"), "stop", "--force"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        remaining = processes.session_members(self.process.pid) + processes.tagged(self.tag)
        self.stop_report = {"killed_after_grace": left, "outside_session": len(strays), "remaining": len(remaining)}
        if remaining:
            raise PeerError(f"{len(remaining)} process(es) of the server are still alive after SIGKILL: {remaining}")


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _health(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


# --- load ------------------------------------------------------------------------------------------

def timed_stream(port: int, path: str, prompt: str, max_tokens: int) -> StreamTiming:
    """One streamed request; each NDJSON line is one token, timed as it arrives."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        return time_tokens(_token_lines(connection, path, body))
    except TimeoutError:
        raise PeerError(f"POST {path} sent nothing for {REQUEST_TIMEOUT_S}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise PeerError(f"POST {path} failed: {type(exc).__name__}: {_first_line(str(exc))}") from None
    finally:
        connection.close()


def _token_lines(connection: http.client.HTTPConnection, path: str, body: str) -> Iterator[bytes]:
    """Sends the request on the first pull, so the clock covers it, as it does for mpsd's streams."""
    connection.request("POST", path, body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise PeerError(f"POST {path} answered HTTP {response.status}: {response.read()[:200]!r}")
    while line := response.readline():
        if line.strip():
            json.loads(line)
            yield line


def aggregate_tps(server: PeerServer, prompt: str, max_tokens: int, streams: int, repeats: int) -> float:
    """As benchmarks.clients.aggregate_tps, against a peer server."""
    return timing.aggregate_tps(lambda: server.stream(prompt, max_tokens), streams, repeats)[0]


# --- the run ---------------------------------------------------------------------------------------

def run_peers(settings, model_dir: str, progress: Callable[[str], None]) -> dict:
    """Every peer: {"tps", "ttft_ms", "scaling", "replicas", "version", ...}, or {"error": why}. Never raises."""
    results = {}
    for name in PEERS:
        try:
            results[name] = run_peer(PEER_SPECS[name], settings, model_dir, progress)
        except PeerError as exc:
            results[name] = {"error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a peer's failure is a figure, not a crash of the benchmark
            results[name] = {"error": f"{type(exc).__name__}: {_first_line(str(exc))}"}
        if "error" in results[name]:
            progress(f"{name}: not run: {results[name]['error']}")
    return results


def run_peer(peer: Peer, settings, model_dir: str, progress) -> dict:
    n_cores = cores()
    version, install_s = ensure_venv(peer, progress)
    scaling: list[float] = []
    starts: list[float] = []
    ttfts: list[float] = []
    for count in range(1, settings.max_workers + 1):
        threads = worker_threads(count, n_cores)
        progress(f"{peer.name}: {count} replica(s) x {threads} thread(s), {count} stream(s)")
        server = PeerServer(peer, model_dir, count, threads, n_cores)
        try:
            starts.append(round(server.start_to_ready_s, 3))
            _concurrently(lambda _: server.stream(settings.prompt, 2), count)   # every replica routed to once
            if count == 1:   # TTFT as mpsd's: one replica, sequential 1-token requests
                ttfts = [server.stream(settings.prompt, 1).ttft_s for _ in range(settings.ttft_requests)]
            scaling.append(aggregate_tps(server, settings.prompt, settings.max_tokens, count, settings.repeats))
        finally:
            server.stop()
            if server.stop_report["killed_after_grace"] or server.stop_report["outside_session"]:
                progress(f"{peer.name}: stopped; {server.stop_report}")
    progress(f"{peer.name}: {scaling[-1]:.0f} tokens/s with {settings.max_workers} replica(s)")
    return {"tps": scaling[-1], "ttft_ms": percentiles_ms(ttfts), "scaling": scaling,
            "replicas": settings.max_workers, "version": version, "install_s": round(install_s, 1),
            "start_to_ready_s": starts}


def _concurrently(call, count: int) -> list:
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(call, range(count)))


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]
