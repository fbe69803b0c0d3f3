"""What a live worker holds, as the OS sees it: its whole process tree, without clean file-backed pages.

A worker may start processes of its own (an engine backend runs an external
server, llama-server or mlx_lm.server, as its child, in a process group of
its own, with a small guard process), so a worker's memory is the sum over
its pid and every descendant (gone or hidden processes are skipped).

The footprint (what status shows as a worker's memory, and what admission
learns a model's footprint from) is what the tree alone holds and the kernel
cannot drop: on macOS `phys_footprint` (proc_pid_rusage; Metal allocations
included, clean mmap'd weights not), on Linux private dirty pages plus swap
(from /proc/PID/smaps_rollup). Resident pages that are clean and file-backed
(for an engine, mostly its mmap'd weights) are reported apart, as
`clean_bytes`: two replicas of one model file map the same page-cache pages,
so that part is shown once per model (`shared_part`), not once per worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import pathlib
import struct
import sys
import time
from collections.abc import Callable, Iterable

import psutil

LIBPROC = "/usr/lib/libproc.dylib"
RUSAGE_INFO_V4 = 4
RUSAGE_BUFFER_SIZE = 512  # rusage_info_v4 is ~300 bytes; room for growth
PHYS_FOOTPRINT_OFFSET = 72  # ri_phys_footprint in rusage_info_v4
# Reading smaps_rollup walks the process's page tables (a few ms per resident GiB), so MemoryReader reads a pid
# again only once the last read's cost is at most this share of the time since it, and at least every MAX_AGE_S.
READ_SHARE = 0.02
MAX_AGE_S = 10.0
FORGET_AFTER_S = 60.0  # a pid not asked about for this long is dropped from the reader's memory


@dataclasses.dataclass(frozen=True)
class ProcessMemory:
    """Sums over a process tree, in bytes; all zero without a process."""

    footprint: int = 0    # what the tree alone holds and the OS cannot drop (Linux: private dirty + swap)
    rss: int = 0          # resident pages, shared and clean file-backed ones included
    uss: int = 0          # private pages, clean and dirty (Linux; 0 elsewhere)
    pss: int = 0          # resident pages, each shared one divided among the processes mapping it (Linux; 0 elsewhere)
    clean_bytes: int = 0  # resident clean pages (Linux: file-backed, shared or not; macOS: rss - footprint)
    processes: int = 0    # how many processes were measured

    def __add__(self, other: ProcessMemory) -> ProcessMemory:
        return ProcessMemory(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


NO_MEMORY = ProcessMemory()


def shared_part(memories: Iterable[ProcessMemory]) -> tuple[int, int]:
    """One model's clean pages counted once: the most any of its workers maps, and how many workers map some.

    Replicas of one model map the same file, so the largest worker's clean
    pages stand for the part they share; summing them would count the
    weights once per replica.
    """
    clean = [m.clean_bytes for m in memories if m.clean_bytes > 0]
    return max(clean, default=0), len(clean)


# --- Linux: /proc/PID/smaps_rollup ----------------------------------------------


def parse_smaps_rollup(text: str) -> dict[str, int]:
    """`Key:  123 kB` lines as {key: bytes}; the header line (the address range) and anything else skipped."""
    fields = {}
    for line in text.splitlines():
        key, colon, rest = line.partition(":")
        parts = rest.split()
        if colon and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[key.strip()] = int(parts[0]) * 1024
    return fields


def rollup_memory(fields: dict[str, int]) -> ProcessMemory:
    """One process's figures from its parsed smaps_rollup."""
    get = fields.get
    return ProcessMemory(
        footprint=get("Private_Dirty", 0) + get("Swap", 0), rss=get("Rss", 0),
        uss=get("Private_Clean", 0) + get("Private_Dirty", 0), pss=get("Pss", 0),
        clean_bytes=get("Shared_Clean", 0) + get("Private_Clean", 0), processes=1)


def read_smaps_rollup(pid: int) -> str | None:
    """None when it cannot be read (another user, a kernel before 4.14, the process gone): psutil is asked instead."""
    try:
        return pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None


def _resident_memory(process: psutil.Process) -> ProcessMemory:
    """psutil's figures where nothing better can be read: rss less its file-backed part (Linux's `shared`)."""
    info = process.memory_info()
    shared = min(getattr(info, "shared", 0), info.rss)
    return ProcessMemory(footprint=info.rss - shared, rss=info.rss, clean_bytes=shared, processes=1)


# --- macOS: phys_footprint through libproc -----------------------------------


def parse_phys_footprint(buffer: bytes) -> int:
    """ri_phys_footprint from a raw rusage_info_v4 (little-endian uint64)."""
    if len(buffer) < PHYS_FOOTPRINT_OFFSET + 8:
        raise ValueError(f"rusage_info_v4 buffer too short: {len(buffer)} bytes")
    return struct.unpack_from("<Q", buffer, PHYS_FOOTPRINT_OFFSET)[0]


@functools.cache
def _libproc_rusage() -> Callable[..., int] | None:
    try:
        fn = ctypes.CDLL(LIBPROC, use_errno=True).proc_pid_rusage
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def mac_phys_footprint(pid: int, *, proc_pid_rusage: Callable[..., int] | None = None) -> int | None:
    """What Activity Monitor shows, Metal allocations included (RSS omits
    them); None when libproc is missing or refuses (gone, other user)."""
    fn = proc_pid_rusage or _libproc_rusage()
    if fn is None:
        return None
    buffer = ctypes.create_string_buffer(RUSAGE_BUFFER_SIZE)
    if fn(pid, RUSAGE_INFO_V4, ctypes.cast(buffer, ctypes.c_void_p)) != 0:
        return None
    return parse_phys_footprint(buffer.raw)


def _mac_memory(process: psutil.Process, phys_footprint: Callable[[int], int | None]) -> ProcessMemory:
    """phys_footprint (RSS when libproc refuses); what RSS holds beyond it is taken as clean pages, roughly."""
    rss = process.memory_info().rss
    footprint = phys_footprint(process.pid)
    footprint = rss if footprint is None else footprint
    return ProcessMemory(footprint=footprint, rss=rss, clean_bytes=max(0, rss - footprint), processes=1)


# --- the tree ------------------------------------------------------------------


def tree_memory(
    pid: int,
    *,
    platform: str = sys.platform,
    phys_footprint: Callable[[int], int | None] = mac_phys_footprint,
    read_rollup: Callable[[int], str | None] = read_smaps_rollup,
) -> ProcessMemory:
    """The sums over pid and all its descendants; NO_MEMORY for pid 0 or a process that is gone."""
    if not pid:
        return NO_MEMORY
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return NO_MEMORY

    def one(process: psutil.Process) -> ProcessMemory:
        if platform == "darwin":
            return _mac_memory(process, phys_footprint)
        text = read_rollup(process.pid) if platform.startswith("linux") else None
        return rollup_memory(parse_smaps_rollup(text)) if text else _resident_memory(process)

    total = NO_MEMORY
    for process in tree:
        try:
            if process.status() != psutil.STATUS_ZOMBIE:  # exited, not yet reaped: holds nothing
                total += one(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def process_footprint_bytes(
    pid: int,
    *,
    platform: str = sys.platform,
    phys_footprint: Callable[[int], int | None] = mac_phys_footprint,
) -> int:
    """What a worker's process tree holds, clean file-backed pages left out; 0 if it is gone or hidden."""
    return tree_memory(pid, platform=platform, phys_footprint=phys_footprint).footprint


class MemoryReader:
    """tree_memory per pid, read again only once it is due (READ_SHARE, MAX_AGE_S): the fleet's health probes,
    status, metrics and the status page all ask, each about once a second, on the daemon's event loop."""

    def __init__(self, measure: Callable[[int], ProcessMemory] = tree_memory,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._measure = measure
        self._clock = clock
        self._read: dict[int, tuple[float, float, ProcessMemory]] = {}  # pid: (read at, seconds it took, figures)

    def __call__(self, pid: int) -> ProcessMemory:
        if not pid:
            return NO_MEMORY
        now = self._clock()
        if (last := self._read.get(pid)) and now - last[0] < min(last[1] / READ_SHARE, MAX_AGE_S):
            return last[2]
        memory = self._measure(pid)
        done = self._clock()
        self._read = {p: entry for p, entry in self._read.items() if done - entry[0] < FORGET_AFTER_S}
        self._read[pid] = (done, done - now, memory)
        return memory


def pid_readers(footprint_of_pid: Callable[[int], int] | None = None,
                memory_of_pid: Callable[[int], ProcessMemory] | None = None,
                ) -> tuple[Callable[[int], int], Callable[[int], ProcessMemory]]:
    """What the fleet reads of a worker's pid: its footprint (admission learns from it) and its figures (status).

    By default both come from one MemoryReader. A footprint given alone (a
    test's fake) stands for the whole figure; figures given alone give the
    footprint too.
    """
    if memory_of_pid is None:
        memory_of_pid = MemoryReader() if footprint_of_pid is None else _footprint_only(footprint_of_pid)
    return footprint_of_pid or _footprint_of(memory_of_pid), memory_of_pid


def _footprint_only(footprint_of_pid: Callable[[int], int]) -> Callable[[int], ProcessMemory]:
    return lambda pid: ProcessMemory(footprint=footprint_of_pid(pid), processes=1) if pid else NO_MEMORY


def _footprint_of(memory_of_pid: Callable[[int], ProcessMemory]) -> Callable[[int], int]:
    return lambda pid: memory_of_pid(pid).footprint
