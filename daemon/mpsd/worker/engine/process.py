"""The engine's OS process: started in a process group of its own (in the worker's session, so the guard below
may join it), watched until healthy, never left behind.

No orphan may keep holding wired memory, whichever process dies first:
* the worker stops: it sends SIGTERM to the engine's group, then SIGKILL;
* the worker is killed (SIGKILL, or the daemon's death taking it down): a
  guard, a tiny stdlib-only Python in the engine's group whose parent is the
  worker, sees its parent change and kills the group (macOS has no
  PR_SET_PDEATHSIG, and that signal would only reach the engine itself,
  not what it started);
* the engine dies: the worker exits too, with the engine's last lines in its
  stderr, so the daemon classifies the death (OOM signatures included) and
  restarts both.
The engine's stdout and stderr are read line by line into a ring and copied to
the worker's stderr as they come, which the daemon reads like any worker's.
"""

from __future__ import annotations

import collections
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

STDERR_TAIL_LINES = 50
REASON_LINES = 5        # of the engine's last lines, how many a failure names
GUARD_POLL_S = 0.1
GUARD_CODE = """
import os, signal, sys, time
parent, group = int(sys.argv[1]), int(sys.argv[2])
while os.getppid() == parent:
    time.sleep(%s)
try:
    os.killpg(group, signal.SIGKILL)
except OSError:
    pass
""" % GUARD_POLL_S


class EngineStartError(RuntimeError):
    """The engine could not be started or never became healthy; the message names the command and its last lines."""


def free_port() -> int:
    """A loopback port nobody holds now; the engine binds it a moment later (it may lose a race: an engine that
    then says its port was taken is started again on another, backend.PORT_ATTEMPTS)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def describe_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def status_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


class EngineProcess:
    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                 echo: Callable[[str], None] | None = None, quiet: Callable[[str], bool] = lambda line: False) -> None:
        self.argv = argv
        self._quiet = quiet  # lines not worth keeping: the engine's access log of the worker's own health probes
        self._env = env
        self._cwd = cwd
        self._echo = echo or _to_stderr
        self._tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._popen: subprocess.Popen | None = None
        self._guard: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.stopping = threading.Event()
        self.ended = threading.Event()  # set once wait() has seen it exit
        self._waiting = False

    @property
    def pid(self) -> int:
        return self._popen.pid if self._popen else 0

    @property
    def command(self) -> str:
        return describe_command(self.argv)

    def tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        return list(self._tail)[-lines:]

    def start(self) -> None:
        try:
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=self._env, cwd=self._cwd, process_group=0)
        except FileNotFoundError:
            raise EngineStartError(f"engine command not found: {self.argv[0]!r} (command: {self.command})") from None
        except OSError as exc:
            raise EngineStartError(f"engine command could not be run: {exc} (command: {self.command})") from None
        self._guard = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", GUARD_CODE, str(os.getpid()), str(self._popen.pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            process_group=self._popen.pid)
        self._reader = threading.Thread(target=self._read_output, name="engine-output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self._popen is not None and self._popen.stdout is not None
        for raw in self._popen.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if self._quiet(line):
                continue
            self._tail.append(line)
            self._echo(line)

    def poll(self) -> int | None:
        """Its return code once it has exited, else None. While a thread blocks in wait(), Popen.poll() cannot
        reap (it only ever says None then), so that thread's word is taken."""
        if self._popen is None:
            return None
        if self.ended.is_set():
            return self._popen.returncode
        return None if self._waiting else self._popen.poll()

    def wait(self) -> int:
        """The engine's return code once it is gone and all it wrote has been read."""
        assert self._popen is not None
        self._waiting = True
        returncode = self._popen.wait()
        self.ended.set()
        if self._reader is not None:
            self._reader.join(timeout=2.0)
        return returncode

    def failure(self, what: str) -> str:
        """One line for a FATAL reason: what happened, the command, and its last lines."""
        lines = [line.strip() for line in self.tail() if line.strip()][-REASON_LINES:]
        said = " | ".join(lines) if lines else "it wrote nothing"
        return f"{what}; command: {self.command}; its last output: {said}"

    def stop(self, grace_s: float) -> None:
        """SIGTERM to the whole group, SIGKILL after grace_s: whatever the engine started goes too."""
        self.stopping.set()
        if self._popen is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self._popen.wait()
        if self._guard is not None:
            self._guard.wait()

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self._popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def wait_until(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.1,
               gave_up: Callable[[], bool] = lambda: False) -> bool:
    """True once condition() holds; False at the timeout or as soon as gave_up() holds."""
    deadline = time.monotonic() + timeout_s
    while True:
        if condition():
            return True
        if gave_up() or time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
