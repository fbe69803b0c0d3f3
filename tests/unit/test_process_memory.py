"""What a worker's process tree holds: smaps_rollup parsed, a real tree of processes summed (dirty anonymous memory
counted, a clean file mapping not), macOS through injected fakes, the reader that spares the event loop, and the
shared part of a model's workers counted once."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import subprocess
import sys

import psutil
import pytest
from mpsd.supervisor.memory.process_memory import (
    MAX_AGE_S,
    NO_MEMORY,
    MemoryReader,
    ProcessMemory,
    parse_smaps_rollup,
    pid_readers,
    read_smaps_rollup,
    rollup_memory,
    shared_part,
    tree_memory,
)

MiB = 1 << 20
ANON_BYTES = 50 * MiB
FILE_BYTES = 64 * MiB

# /proc/self/smaps_rollup of a Python process on Linux 6.18 (x86_64) that mapped a 64 MiB file read-only and read
# every page of it, then wrote 20 MiB of anonymous memory: the file is its Private_Clean, the writes its Private_Dirty.
RECORDED_ROLLUP = """\
561ac7e85000-7fff85e41000 ---p 00000000 00:00 0                          [rollup]
Rss:               94808 kB
Pss:               89426 kB
Pss_Dirty:         23400 kB
Pss_Anon:          23400 kB
Pss_File:          66026 kB
Pss_Shmem:             0 kB
Shared_Clean:       5872 kB
Shared_Dirty:          0 kB
Private_Clean:     65536 kB
Private_Dirty:     23400 kB
Referenced:        94808 kB
Anonymous:         23400 kB
KSM:                   0 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
ShmemPmdMapped:        0 kB
FilePmdMapped:         0 kB
Shared_Hugetlb:        0 kB
Private_Hugetlb:       0 kB
Swap:                  0 kB
SwapPss:               0 kB
Locked:                0 kB
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/smaps_rollup")


def test_smaps_rollup_is_parsed_into_bytes_and_the_header_is_skipped():
    fields = parse_smaps_rollup(RECORDED_ROLLUP)
    assert fields["Rss"] == 94808 * 1024 and fields["Private_Clean"] == FILE_BYTES and fields["Swap"] == 0
    assert len(fields) == 22 and not any("rollup" in key or "-" in key for key in fields)
    memory = rollup_memory(fields)
    assert memory == ProcessMemory(footprint=23400 * 1024, rss=94808 * 1024, uss=(65536 + 23400) * 1024,
                                   pss=89426 * 1024, clean_bytes=(5872 + 65536) * 1024, processes=1)


def test_the_footprint_counts_swap_too_what_the_process_alone_holds_and_cannot_be_dropped():
    memory = rollup_memory(parse_smaps_rollup("Private_Dirty:  100 kB\nSwap:   28 kB\nPrivate_Clean: 4 kB\n"))
    assert (memory.footprint, memory.uss, memory.clean_bytes) == (128 * 1024, 104 * 1024, 4 * 1024)
    assert parse_smaps_rollup("") == {} and rollup_memory({}) == ProcessMemory(processes=1)


# --- a real tree -----------------------------------------------------------------

DIRTY = f"b = bytearray({ANON_BYTES})\nfor i in range(0, len(b), 4096): b[i] = 1\n"
MAPPED = ("import mmap\nf = open({path!r}, 'rb')\nm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
          "sum(m[i] for i in range(0, len(m), 4096))\n")
IDLE = "pass\n"
# The root starts one child per code given, waits until each has done its part, prints their pids, and every
# process waits for stdin to close (the test's end) before exiting.
ROOT = """\
import subprocess, sys
kids = [subprocess.Popen([sys.executable, "-c", code + "print('ready', flush=True)\\nimport sys\\nsys.stdin.read()"],
                         stdout=subprocess.PIPE, text=True) for code in sys.argv[1:]]
for kid in kids:
    kid.stdout.readline()
print(" ".join(str(kid.pid) for kid in kids), flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def process_tree(*codes: str):
    """(root pid, child pids) of a live tree: the root, and one child per code, each having run it."""
    root = subprocess.Popen([sys.executable, "-c", ROOT, *codes], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    try:
        yield root.pid, [int(pid) for pid in root.stdout.readline().split()]
    finally:
        root.stdin.close()  # the children share the root's stdin: all of them see it end
        try:
            root.wait(timeout=10)
        except subprocess.TimeoutExpired:
            root.kill()
            root.wait()


@pytest.fixture
def weights(tmp_path: pathlib.Path) -> pathlib.Path:
    """A file written through to disk, so its page-cache pages are clean when a process maps them."""
    filesystem = max((p for p in psutil.disk_partitions(all=True) if str(tmp_path).startswith(p.mountpoint)),
                     key=lambda p: len(p.mountpoint))
    if filesystem.fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is on {filesystem.fstype}: its pages are shared memory, never clean file pages")
    path = tmp_path / "weights.bin"
    with path.open("wb") as file:
        file.write(os.urandom(FILE_BYTES))
        file.flush()
        os.fsync(file.fileno())
    return path


@linux_only
def test_a_tree_counts_its_childrens_dirty_memory_and_leaves_a_clean_file_mapping_out(weights):
    with process_tree(DIRTY, MAPPED.format(path=str(weights))) as (root, (dirty, mapped)):
        tree = tree_memory(root)
        alone = {pid: tree_memory(pid) for pid in (dirty, mapped)}
        alone[root] = rollup_memory(parse_smaps_rollup(read_smaps_rollup(root)))  # the root's own, children left out
    assert alone[dirty].processes == alone[mapped].processes == 1, "a child is a tree of its own too"
    parts = alone[root] + alone[dirty] + alone[mapped]
    assert tree.processes == parts.processes == 3
    assert all(abs(a - b) < MiB for a, b in zip(dataclasses.astuple(tree), dataclasses.astuple(parts))), (tree, parts)
    assert alone[dirty].footprint >= ANON_BYTES, "the written anonymous memory is what the child holds"
    assert alone[mapped].rss >= FILE_BYTES and alone[mapped].clean_bytes >= FILE_BYTES, "RSS counts the file"
    assert alone[mapped].footprint < alone[dirty].footprint - 40 * MiB, "the footprint does not"
    assert alone[mapped].footprint < alone[mapped].rss - FILE_BYTES + 8 * MiB
    assert tree.footprint >= ANON_BYTES and tree.clean_bytes >= FILE_BYTES and tree.uss >= ANON_BYTES + FILE_BYTES


@linux_only
def test_two_processes_mapping_one_file_share_it_and_the_model_shows_it_once(weights):
    code = MAPPED.format(path=str(weights))
    with process_tree(code, code) as (_, (first, second)):
        replicas = [tree_memory(first), tree_memory(second)]
    for replica in replicas:
        assert replica.clean_bytes >= FILE_BYTES and replica.footprint < FILE_BYTES
        assert replica.pss < replica.rss - FILE_BYTES // 2 + 8 * MiB, "PSS halves pages two processes map"
    shared, workers = shared_part(replicas + [NO_MEMORY])
    assert workers == 2 and shared == max(r.clean_bytes for r in replicas) < FILE_BYTES * 2


def test_no_process_or_a_gone_one_is_all_zero():
    assert tree_memory(0) == NO_MEMORY
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert tree_memory(gone.pid) == NO_MEMORY
    assert tree_memory(gone.pid, platform="darwin", phys_footprint=lambda pid: None) == NO_MEMORY


def test_where_smaps_rollup_cannot_be_read_psutil_gives_rss_less_its_file_pages():
    with process_tree(IDLE) as (_, (child,)):
        memory = tree_memory(child, read_rollup=lambda pid: None)
        info = psutil.Process(child).memory_info()
    assert memory.processes == 1 and memory.uss == memory.pss == 0 and memory.rss > 0
    assert memory.footprint + memory.clean_bytes == memory.rss
    if sys.platform.startswith("linux"):
        assert memory.clean_bytes > 0 and abs(memory.clean_bytes - info.shared) < 4 * MiB


def test_on_a_mac_each_process_is_its_phys_footprint_and_clean_pages_are_what_rss_holds_beyond_it():
    with process_tree(IDLE) as (root, (child,)):
        figures = {root: 30 * MiB, child: 1}  # the child: Metal buffers aside, almost nothing of its own
        memory = tree_memory(root, platform="darwin", phys_footprint=figures.get)
        refused = tree_memory(child, platform="darwin", phys_footprint=lambda pid: None)
    assert memory.processes == 2 and memory.footprint == 30 * MiB + 1 and memory.uss == memory.pss == 0
    assert memory.clean_bytes > 0 and memory.clean_bytes <= memory.rss - 1
    assert refused.footprint == refused.rss > 0 and refused.clean_bytes == 0, "libproc refused: RSS, as before"


# --- reading on the event loop -------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_reader_reads_a_pid_again_once_the_last_reads_cost_is_small_beside_the_time_since():
    clock, reads = Clock(), []

    def measure(pid: int) -> ProcessMemory:
        reads.append(pid)
        clock.now += 0.01  # a read that took 10 ms: read again after 0.5 s (2% of the daemon's time)
        return ProcessMemory(footprint=len(reads), processes=1)

    reader = MemoryReader(measure, clock)
    assert reader(0) == NO_MEMORY and reads == []
    assert reader(7).footprint == 1
    clock.now += 0.4
    assert reader(7).footprint == 1 and reader(8).footprint == 2 and reads == [7, 8]
    clock.now += 0.2
    assert reader(7).footprint == 3 and reads == [7, 8, 7]


def test_a_slow_read_is_still_repeated_every_max_age():
    clock = Clock()

    def slow(pid: int) -> ProcessMemory:
        clock.now += 5.0
        return ProcessMemory(footprint=int(clock.now), processes=1)

    reader = MemoryReader(slow, clock)
    first = reader(7)
    clock.now += MAX_AGE_S - 1
    assert reader(7) == first
    clock.now += 1
    assert reader(7) != first


def test_the_fleet_reads_both_figures_from_one_reader_unless_a_test_gives_one():
    footprint, memory = pid_readers()
    assert isinstance(memory, MemoryReader) and footprint(os.getpid()) > 0 and footprint(0) == 0
    footprint, memory = pid_readers(footprint_of_pid=lambda pid: 5)
    assert footprint(3) == 5 and memory(3) == ProcessMemory(footprint=5, processes=1) and memory(0) == NO_MEMORY
    footprint, memory = pid_readers(memory_of_pid=lambda pid: ProcessMemory(footprint=9, rss=12, processes=1))
    assert footprint(3) == 9 and memory(3).rss == 12


def test_the_shared_part_is_the_most_any_worker_maps_and_how_many_map_some():
    assert shared_part([]) == (0, 0)
    assert shared_part([ProcessMemory(clean_bytes=3), ProcessMemory(clean_bytes=5), NO_MEMORY]) == (5, 2)
    assert ProcessMemory(1, 2, 3, 4, 5, 1) + ProcessMemory(10, 20, 30, 40, 50, 2) == ProcessMemory(11, 22, 33, 44, 55, 3)
