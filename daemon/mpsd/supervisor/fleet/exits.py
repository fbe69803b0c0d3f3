"""Why a worker process ended, from its wait status and its last stderr lines.

Pure: given a return code (negative = killed by that signal, as asyncio
reports it) and text, it returns a verdict. What out-of-memory text looks
like lives in mpsd.oom, shared with the worker.
"""

from __future__ import annotations

import dataclasses
import enum
import signal
from typing import Sequence

from mpsd.exitcodes import EXIT_BOOT_FAILURE
from mpsd.oom import find_oom_signature, find_oom_warning


class ExitKind(str, enum.Enum):
    CLEAN = "clean"
    CRASH = "crash"
    OOM = "oom"
    KILLED = "killed"
    BOOT_FAILURE = "boot-failure"


@dataclasses.dataclass(frozen=True)
class ExitVerdict:
    kind: ExitKind
    description: str


def classify_exit(returncode: int, stderr_tail: Sequence[str], *, stop_requested: bool = False) -> ExitVerdict:
    if returncode == 0:
        return ExitVerdict(ExitKind.CLEAN, "exited cleanly")
    if returncode == EXIT_BOOT_FAILURE:
        last = next((line for line in reversed(stderr_tail) if line.strip()), "no stderr")
        return ExitVerdict(ExitKind.BOOT_FAILURE, f"could not load its model: {last.strip()}")
    oom = find_oom_signature(stderr_tail)
    if oom:
        return ExitVerdict(ExitKind.OOM, f"out of memory ({oom}), {_status_text(returncode)}")
    warned = find_oom_warning(stderr_tail)
    if warned and not (stop_requested and returncode < 0):
        return ExitVerdict(ExitKind.OOM, f"probably out of memory ({warned}), {_status_text(returncode)}")
    if returncode < 0 and -returncode == signal.SIGKILL:
        cause = "stop timeout" if stop_requested else "SIGKILL from outside: often the kernel's OOM killer or an operator"
        return ExitVerdict(ExitKind.KILLED, f"killed by SIGKILL ({cause})")
    if returncode < 0 and stop_requested and -returncode in (signal.SIGTERM, signal.SIGINT):
        return ExitVerdict(ExitKind.CLEAN, f"stopped by {signal.Signals(-returncode).name}")
    return ExitVerdict(ExitKind.CRASH, f"crashed: {_status_text(returncode)}")


def _status_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"
