"""One worker OS process: exec, output capture, signals, and its gRPC channel (and the link requests use).

This is the only place that touches the process; the fleet decides, this
carries out. Workers get their own session (process group) so a signal to the
daemon's group never reaches them by accident, and the daemon stops them
itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
from typing import Callable

import grpc

from mpsd.supervisor.fleet.worker_link import WorkerLink
from mpsd.v1 import worker_pb2, worker_pb2_grpc
from mpsd.worker_spec import WorkerSpec, steps_socket

STDERR_TAIL_LINES = 50     # what exit classification and status read: the lines around a death
STDERR_KEPT_LINES = 1000   # what `mpsctl logs` can show
log = logging.getLogger("mpsd.worker")


class WorkerProcess:
    def __init__(self, spec: WorkerSpec, env: dict[str, str]) -> None:
        self.worker_id = spec.worker_id
        self.socket_path = spec.socket
        self._spec = spec
        self._env = env
        self._process: asyncio.subprocess.Process | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=STDERR_KEPT_LINES)
        self.stderr_count = 0  # lines ever read, so a follower knows what it has not seen
        self._channel: grpc.aio.Channel | None = None
        self.stub: worker_pb2_grpc.WorkerStub | None = None
        self.link: WorkerLink | None = None  # what requests reach it by (worker_link.py)
        self._pumps: list[asyncio.Task] = []

    @property
    def pid(self) -> int:
        return self._process.pid if self._process else 0

    async def start(self) -> None:
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)
        self._process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "mpsd.worker", "--spec", self._spec.to_json(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )
        self._pumps = [
            asyncio.create_task(self._pump(self._process.stderr, self._keep_stderr)),
            asyncio.create_task(self._pump(self._process.stdout, lambda line: None)),
        ]
        self._channel = grpc.aio.insecure_channel(f"unix:{self.socket_path}")
        self.stub = worker_pb2_grpc.WorkerStub(self._channel)
        self.link = WorkerLink(self.stub, self.worker_id, steps_socket(self.socket_path))

    async def stats(self, timeout_s: float, prefix_cache_budget: int | None = None) -> worker_pb2.WorkerStats:
        """The worker's counters; ConnectionError while it cannot answer (not listening yet, busy, gone).

        prefix_cache_budget: the budget its prefix cache is to keep from now (None: as it has it)."""
        if self.stub is None or not os.path.exists(self.socket_path):
            raise ConnectionError("socket not there yet")
        request = worker_pb2.StatsRequest(prefix_cache_budget=prefix_cache_budget)
        try:
            return await self.stub.Stats(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise ConnectionError(exc.details() or exc.code().name) from exc

    @property
    def stderr_tail(self) -> list[str]:
        return list(self._stderr)[-STDERR_TAIL_LINES:]

    def stderr_since(self, count: int) -> tuple[list[str], int]:
        """Lines read after the first `count` (as many as are still kept), and the count to ask with next."""
        new = min(self.stderr_count - count, len(self._stderr))
        return (list(self._stderr)[-new:] if new > 0 else []), self.stderr_count

    def _keep_stderr(self, line: str) -> None:
        self._stderr.append(line)
        self.stderr_count += 1

    async def _pump(self, stream: asyncio.StreamReader, keep: Callable[[str], None]) -> None:
        """Logs each line as it comes: an OOM line must be seen before the exit is."""
        while True:
            raw = await stream.readline()
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            keep(line)
            log.info("%s | %s", self.worker_id, line, extra={"worker": self.worker_id, "pid": self.pid})

    async def wait(self) -> int:
        """The return code once the process is gone and its output fully read."""
        assert self._process is not None
        returncode = await self._process.wait()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        return returncode

    def send_signal(self, signum: signal.Signals) -> None:
        """ESRCH means it is already gone: the reaper will report it, nothing to do here."""
        if self._process is None or self._process.returncode is not None:
            return
        try:
            self._process.send_signal(signum)
        except ProcessLookupError:
            pass

    async def close_channel(self) -> None:
        """Only once no call can be using it: closing cancels calls, which hides the real error."""
        if self.link is not None:
            await self.link.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        if self._process is not None and self._process.returncode is not None:
            for path in (self.socket_path, steps_socket(self.socket_path)):  # what a killed worker left behind
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
