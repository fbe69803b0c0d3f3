"""Starting and stopping a real mpsd for integration tests.

The daemon runs as a real process with real workers; tests talk to it over
real sockets. Every helper polls with a deadline, never a fixed sleep, and
the fixture kills whatever is left in `finally`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import psutil
from mpsd import paths
from mpsd.proto_plain import to_plain
from mpsd.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

ROOT = pathlib.Path(__file__).resolve().parents[1]
LISTEN_LINE = re.compile(r"public API listening on (\S+)")
SERVING_LINE = re.compile(r"mpsd \S+ serving ")
EDGE_LINE = re.compile(r"HTTP edge listening on (https?://\S+) ")  # /v1, /metrics and the status page, one listener


def data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MPSD_DATA_DIR") or paths.default_data_dir())


def soak_factor() -> int:
    """How many times longer the reliability suite runs: 1 in CI, N with MPSD_SOAK=N (`./dev soak`)."""
    return max(1, int(os.environ.get("MPSD_SOAK") or 1))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def write_probe(path: pathlib.Path, budget: int, used: int = 0) -> None:
    """What a `file:` memory probe reads: tests set the machine's memory to known numbers."""
    path.write_text(json.dumps({"budget_bytes": budget, "used_bytes": used}))


def metric(daemon: "Daemon", name: str, **labels: str) -> float:
    """One sample from the daemon's /metrics now; 0 for a labelled series not created yet."""
    with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
        text = response.read().decode()
    wanted = frozenset(labels.items())
    return next((s.value for family in text_string_to_metric_families(text) for s in family.samples
                 if s.name == name and frozenset(s.labels.items()) == wanted), 0.0)


def pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Daemon:
    def __init__(self, tmp_path: pathlib.Path, config_text: str, listen: str = "127.0.0.1:0",
                 http_listen: str = "127.0.0.1:0") -> None:
        self.dir = tmp_path
        self.listen = listen
        self.http_listen = http_listen
        tmp_path.mkdir(parents=True, exist_ok=True)
        self.state_dir = tmp_path / "state"
        self.config_path = tmp_path / "mpsd.toml"
        self.config_path.write_text(config_text)
        self.log_path = tmp_path / "mpsd.log"
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.metrics_url = ""  # .../metrics on the HTTP edge
        self.http_url = ""  # the OpenAI-compatible API's base URL, .../v1 on the HTTP edge
        self._channels: list[grpc.Channel] = []
        self.seen_worker_pids: set[int] = set()

    def start(self, timeout: float = 30) -> "Daemon":
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mpsd.cli.mpsd_cmd", "serve", "--config", str(self.config_path),
             "--listen", self.listen, "--http-listen", self.http_listen,
             "--state-dir", str(self.state_dir),
             "--data-dir", str(data_dir())],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"),
            start_new_session=True, env=self._env(),
        )
        match = wait_for(lambda: self._exited_early() or LISTEN_LINE.search(self.log()), timeout, "the listening line")
        self.address = match.group(1)
        if self.http_listen:
            edge = wait_for(lambda: self._exited_early() or EDGE_LINE.search(self.log()), timeout,
                            "the HTTP edge line").group(1)
            self.http_url, self.metrics_url = f"{edge}/v1", f"{edge}/metrics"
        # The admin socket opens after the lines above; the daemon says "serving" once it does.
        wait_for(lambda: self._exited_early() or SERVING_LINE.search(self.log()), timeout, "the admin API")
        return self

    @staticmethod
    def _env() -> dict[str, str]:
        """Workers inherit this PYTHONPATH: it is how they find tests/fixtures factories."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "tests"), env.get("PYTHONPATH", "")) if p)
        return env

    def _exited_early(self):
        if self.process.poll() is not None:
            raise AssertionError(f"mpsd exited with {self.process.returncode}:\n{self.log()}")
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def channel(self) -> grpc.Channel:
        channel = grpc.insecure_channel(self.address)
        self._channels.append(channel)
        return channel

    def inference(self) -> inference_pb2_grpc.InferenceStub:
        return inference_pb2_grpc.InferenceStub(self.channel())

    def admin(self) -> admin_pb2_grpc.AdminStub:
        channel = grpc.insecure_channel(f"unix:{paths.admin_socket_path(self.state_dir)}")
        self._channels.append(channel)
        return admin_pb2_grpc.AdminStub(channel)

    def status(self) -> dict:
        status = to_plain(self.admin().Status(admin_pb2.StatusRequest(), timeout=10))
        self.seen_worker_pids |= {w["pid"] for w in status["workers"] if w["pid"]}
        return status

    def worker(self, worker_id: str) -> dict:
        return next(w for w in self.status()["workers"] if w["id"] == worker_id)

    def wait_ready(self, count: int, timeout: float = 120) -> dict:
        def ready():
            self._exited_early()
            status = self.status()
            return status if sum(w["state"] == "READY" for w in status["workers"]) >= count else None
        return wait_for(ready, timeout, f"{count} READY workers", interval=0.2)

    def generate(self, prompt: str = "The module", **fields) -> list[inference_pb2.GenerateResponse]:
        fields.setdefault("model", "demo")
        request = inference_pb2.GenerateRequest(prompt=prompt, **fields)
        return list(self.inference().Generate(request, timeout=60))

    def terminate(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        for pid in self.seen_worker_pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


class Stream:
    """One Generate call read on its own thread, recording what came, how it ended and when."""

    def __init__(self, daemon: Daemon, max_tokens: int, prompt: str = "The", model: str = "slow",
                 timeout: float = 120, **fields) -> None:
        fields.setdefault("temperature", 0)
        self.max_tokens = max_tokens
        self.first_token = threading.Event()
        self.first_token_at = 0.0  # time.monotonic()
        self.messages: list = []
        self.error: grpc.RpcError | None = None
        self.ended_at = 0.0
        self._call = daemon.inference().Generate(inference_pb2.GenerateRequest(
            model=model, prompt=prompt, max_tokens=max_tokens, **fields), timeout=timeout)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                if not self.messages:
                    self.first_token_at = time.monotonic()
                self.messages.append(message)
                self.first_token.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.first_token.set()

    def started(self, timeout: float = 60) -> "Stream":
        assert self.first_token.wait(timeout), "no first token"
        return self

    def cancel(self) -> None:
        self._call.cancel()

    def join(self, timeout: float) -> "Stream":
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "a stream hung"
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def tokens(self) -> list:
        return [m for m in self.messages if not m.HasField("finish")]

    @property
    def text(self) -> str:
        return "".join(m.text for m in self.tokens)

    @property
    def completed(self) -> bool:
        """Ended well with every token asked for (the slow model's greedy "The" never meets end of text)."""
        return (self.error is None and bool(self.messages) and self.messages[-1].HasField("finish")
                and self.messages[-1].finish.usage.completion_tokens == self.max_tokens)

    @property
    def worker_id(self) -> str:
        return self.messages[-1].finish.worker_id if self.completed else ""

    def summary(self) -> str:
        if self.completed:
            return f"completed {self.max_tokens} tokens on {self.worker_id}"
        if self.error is None:
            return f"ended after {len(self.messages)} messages without an error"
        return f"{self.error.code().name} after {len(self.messages)} tokens: {self.error.details()}"


@contextlib.contextmanager
def running_daemon(folder: pathlib.Path, config_text: str, ready: int, listen: str = "127.0.0.1:0",
                   http_listen: str = "127.0.0.1:0"):
    """A started daemon with `ready` READY workers, for module fixtures; closed however the block ends."""
    daemon = Daemon(folder, config_text, listen=listen, http_listen=http_listen)
    try:
        daemon.start()
        daemon.wait_ready(ready)
        yield daemon
    finally:
        daemon.close()


DEMO_ONE_WORKER = """
[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = 1
threads = 1
"""
# A generating model and a Predict model, one worker each: both kinds of request against one daemon.
DEMO_AND_LINEAR = DEMO_ONE_WORKER + """
[[models]]
name = "linear"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
replicas = 1
threads = 1
"""


def demo_config(replicas: int = 2, queue: int = 2, slow_model: pathlib.Path | None = None, slow_replicas: int = 2) -> str:
    """The demo model (batching at its backend's default concurrency), plus (when given) the slow fixture model as
    model "slow" with one slot per worker: it is there to hold a worker busy, so that the next request queues."""
    text = f"""
[daemon]
drain_grace = "20s"
health_interval = "0.5s"

[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = {replicas}
threads = 1
queue = {queue}
"""
    if slow_model:
        text += f"""
[[models]]
name = "slow"
backend = "torch-lm"
path = "{slow_model}"
replicas = {slow_replicas}
concurrency = 1
threads = 1
queue = {queue}
"""
    return text


def slow_config(replicas: int, slow_model: pathlib.Path) -> str:
    return demo_config(replicas=0, slow_model=slow_model, slow_replicas=replicas)
