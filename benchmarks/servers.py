"""An HTTP server under test (a peer, or mlx_lm.server) in its own session: started, waited for, ended.

Ray puts its workers in process groups of their own and some leave the
session, so stopping ends the whole session, then every process carrying the
run's tag in its environment, and checks that none is left.
"""

from __future__ import annotations

import http.client
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from typing import Sequence

from benchmarks import processes
from benchmarks.peer_install import PeerError, last_text_line

START_TIMEOUT_S = 180
STOP_GRACE_S = 20
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class ServerProcess:
    """command gets the port appended as `--port P` (or put where it says "{port}", as mpsd's engine commands do),
    and "{temp_dir}" in it replaced by a directory of its own (removed at stop); ready once GET health_path answers
    200 (and ready_line is logged)."""

    def __init__(self, name: str, command: Sequence[str], log_path: pathlib.Path, env: dict[str, str] | None = None,
                 ready_line: bytes | None = None, cleanup: Sequence[str] = (), health_path: str = "/health",
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.name = name
        self.health_path = health_path
        self.start_timeout_s = start_timeout_s
        self.cleanup = cleanup   # a command run when processes left the session (Ray: `ray stop --force`)
        self.port = free_port()
        self.tag = uuid.uuid4().hex
        self.temp_dir = pathlib.Path(tempfile.mkdtemp(prefix="mpsd-peer-"))
        self.log_path = log_path
        self.ready_line = ready_line
        self.stop_report: dict = {}
        full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "RAY_ADDRESS")}
        full_env.update({processes.TAG_VARIABLE: self.tag, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                         "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TMPDIR": str(self.temp_dir),
                         **(env or {})})
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "wb")
        started = time.perf_counter()
        placed = any("{port}" in part for part in command)
        command = [part.replace("{temp_dir}", str(self.temp_dir)).replace("{port}", str(self.port)) for part in command]
        self.process = subprocess.Popen(command if placed else [*command, "--port", str(self.port)],
                                        stdin=subprocess.DEVNULL,
                                        stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                        cwd=str(self.temp_dir), start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.start_to_ready_s = time.perf_counter() - started

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise PeerError(f"the server exited with code {code} before it was ready: {self.last_log_line()}")
            if health(self.port, self.health_path) and (self.ready_line is None
                                                        or self.ready_line in self.log_path.read_bytes()):
                return
            time.sleep(0.5)
        raise PeerError(f"the server was not ready within {self.start_timeout_s:.0f}s: {self.last_log_line()}")

    def last_log_line(self) -> str:
        try:
            text = ANSI.sub("", self.log_path.read_text(errors="replace"))
        except OSError:
            return "(no log)"
        return last_text_line(text) or "(empty log)"

    def stop(self) -> None:
        left = processes.end_session(self.process.pid, STOP_GRACE_S)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        strays = processes.kill_tagged(self.tag)
        if strays and self.cleanup:
            subprocess.run(list(self.cleanup), stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
        self._log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        remaining = processes.session_members(self.process.pid) + processes.tagged(self.tag)
        self.stop_report = {"killed_after_grace": left, "outside_session": len(strays), "remaining": len(remaining)}
        if remaining:
            raise PeerError(f"{len(remaining)} process(es) of {self.name} are still alive after SIGKILL: {remaining}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(port: int, path: str = "/health") -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()
