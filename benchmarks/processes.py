"""Ending a peer server and everything it started, found through /proc.

Ray puts each of its workers in a process group of its own, and some of its
processes leave the server's session, so killing one group is not enough: the
whole session is ended, and then every process that carries the run's tag in
its environment.
"""

from __future__ import annotations

import os
import signal
import time

TAG_VARIABLE = "MPSD_PEER_RUN"   # set in every peer server's environment, inherited by all it starts


def _proc_stat(pid: str) -> tuple[bytes, int, int] | None:
    """(state, process group, session) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[2]), int(fields[3])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a live process, 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of a session: Ray puts each worker in a process group of its own,
    but all stay in the session the server started."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat and stat[2] == sid and stat[0] != b"Z":
                members.append(int(entry))
    return members


def end_session(sid: int, grace: float) -> int:
    """SIGTERM to every process group of the session, SIGKILL to what is left after grace seconds.
    Returns how many needed the SIGKILL."""
    killed = 0
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        members = session_members(sid)
        if not members:
            return killed
        if sig == signal.SIGKILL:
            killed = len(members)
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and session_members(sid):
            time.sleep(0.2)
    return killed


def kill_group(pgid: int, grace: float) -> None:
    """SIGTERM to a process group, SIGKILL after grace seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def tagged(tag: str) -> list[int]:
    """Live processes whose environment carries this run's tag: inherited, it follows those that left the session."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if needle in environ.read().split(b"\0"):
                    stat = _proc_stat(entry)
                    if stat and stat[0] != b"Z":
                        found.append(int(entry))
        except OSError:
            continue
    return found


def tagged_by_any_run() -> list[int]:
    """Live processes carrying any peer run's tag: what the benchmark started, wherever it went."""
    prefix = f"{TAG_VARIABLE}=".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                if any(item.startswith(prefix) for item in environ.read().split(b"\0")):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL, with no grace, to tagged processes: the session's grace is already spent. Returns those found."""
    strays = tagged(tag)
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and tagged(tag):
        time.sleep(0.2)
    return strays
