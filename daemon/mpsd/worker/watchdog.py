"""Ends the worker when its supervisor dies, so no orphan holds GPU memory.

Linux delivers a signal at once through PR_SET_PDEATHSIG; macOS has no such
call, so a thread also polls the parent pid (a reparented process sees a
different parent). Either path exits within about half a second.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PR_SET_PDEATHSIG = 1
POLL_INTERVAL_S = 0.25


def start(parent_pid: int) -> None:
    _set_death_signal()
    if os.getppid() != parent_pid:
        _exit_orphaned(parent_pid)
    thread = threading.Thread(target=_poll_parent, args=(parent_pid,), name="parent-watchdog", daemon=True)
    thread.start()


def _set_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the polling thread still covers it


def _poll_parent(parent_pid: int) -> None:
    event = threading.Event()
    while not event.wait(POLL_INTERVAL_S):
        if os.getppid() != parent_pid:
            _exit_orphaned(parent_pid)


def _exit_orphaned(parent_pid: int) -> None:
    sys.stderr.write(f"mpsd worker {os.getpid()}: supervisor {parent_pid} is gone; exiting\n")
    sys.stderr.flush()
    os._exit(1)
