"""A real mpsd for a benchmark: started, waited for, measured, stopped."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc
import psutil
from mpsd import paths
from mpsd.proto_plain import to_plain
from mpsd.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc

LISTEN_LINE = re.compile(r"public API listening on (\S+)")
HTTP_LINE = re.compile(r"HTTP edge listening on http://[^:\s]+:(\d+)")
WARMED = re.compile(r"worker (\S+) pid=\d+ STARTING -> READY: model loaded and warmed in ([0-9.]+)s")


class RunningDaemon:
    """http=True serves the HTTP edge (the OpenAI-compatible API) too, on a free loopback port: http_port."""

    def __init__(self, config_text: str, http: bool = False) -> None:
        self.dir = pathlib.Path(tempfile.mkdtemp(prefix="mpsd-bench-"))
        (self.dir / "mpsd.toml").write_text(config_text)
        self.log_path = self.dir / "mpsd.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mpsd.cli.mpsd_cmd", "serve", "--config", str(self.dir / "mpsd.toml"),
             "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0",
             "--http-listen", "127.0.0.1:0" if http else "",
             "--state-dir", str(self.dir / "state")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"), start_new_session=True,
        )
        self.address = _wait(lambda: LISTEN_LINE.search(self.log()), 60, "the listening line").group(1)
        self.http_port = int(_wait(lambda: HTTP_LINE.search(self.log()), 60, "the HTTP line").group(1)) if http else 0
        self.channel = grpc.insecure_channel(self.address)
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self._admin_channel = grpc.insecure_channel(f"unix:{paths.admin_socket_path(self.dir / 'state')}")
        self.admin = admin_pb2_grpc.AdminStub(self._admin_channel)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        return to_plain(self.admin.Status(admin_pb2.StatusRequest(), timeout=10))

    def wait_ready(self, count: int, timeout: float = 300) -> dict:
        def ready():
            if self.process.poll() is not None:
                raise RuntimeError(f"mpsd exited: {self.log()[-2000:]}")
            try:
                status = self.status()
            except grpc.RpcError as exc:  # the admin socket is bound a moment after the public port
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return None
                raise
            return status if sum(w["state"] == "READY" for w in status["workers"]) >= count else None
        return _wait(ready, timeout, f"{count} READY workers")

    def warm_times_s(self) -> list[float]:
        return [float(m.group(2)) for m in WARMED.finditer(self.log())]

    def rss_bytes(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def restart_after_kill_s(self, worker_id: str) -> float:
        """kill -9 a READY worker; seconds until a new process of it is READY again."""
        before = next(w for w in self.status()["workers"] if w["id"] == worker_id)
        started = time.perf_counter()
        os.kill(before["pid"], signal.SIGKILL)
        _wait(lambda: any(w["id"] == worker_id and w["state"] == "READY" and w["pid"] != before["pid"]
                          for w in self.status()["workers"]), 120, "the restart")
        return time.perf_counter() - started

    def stop(self) -> None:
        self.channel.close()
        self._admin_channel.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"benchmark: timed out waiting for {what}")
