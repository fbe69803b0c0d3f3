"""What a live worker process holds, as the OS sees it: libproc's phys_footprint on a Mac (through an injected
rusage call), private dirty pages plus swap on Linux (its whole process tree: test_process_memory.py)."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys

import pytest
from mpsd.supervisor.memory.process_memory import mac_phys_footprint, parse_phys_footprint, process_footprint_bytes

GiB = 1024**3


def rusage_buffer(footprint: int, size: int = 512) -> bytes:
    raw = bytearray(size)
    struct.pack_into("<QQ", raw, 56, 111, 222)  # ri_wired_size, ri_resident_size
    struct.pack_into("<Q", raw, 72, footprint)  # ri_phys_footprint
    return bytes(raw)


def test_parse_phys_footprint_reads_offset_72():
    assert parse_phys_footprint(rusage_buffer(3 * GiB + 5)) == 3 * GiB + 5
    with pytest.raises(ValueError):
        parse_phys_footprint(bytes(79))


def test_mac_phys_footprint_fills_a_buffer_through_libproc():
    calls = []

    def proc_pid_rusage(pid, flavor, buffer):
        calls.append((pid, flavor))
        data = rusage_buffer(7 * GiB)
        ctypes.memmove(buffer, data, len(data))
        return 0

    assert mac_phys_footprint(4242, proc_pid_rusage=proc_pid_rusage) == 7 * GiB
    assert calls == [(4242, 4)]
    assert mac_phys_footprint(4242, proc_pid_rusage=lambda *a: -1) is None


def test_mac_phys_footprint_without_libproc_is_none():
    if sys.platform == "darwin":
        pytest.skip("libproc exists here")
    assert mac_phys_footprint(os.getpid()) is None


def test_process_footprint_on_mac_prefers_phys_footprint_then_rss():
    pid = os.getpid()

    def only_this(p: int) -> int:  # a child this test runner left behind is in the tree too
        return 9 * GiB if p == pid else 0

    assert process_footprint_bytes(pid, platform="darwin", phys_footprint=only_this) == 9 * GiB
    assert process_footprint_bytes(pid, platform="darwin", phys_footprint=lambda p: None) > 0


def test_process_footprint_elsewhere_is_positive_and_zero_when_gone():
    assert process_footprint_bytes(os.getpid()) > 0
    assert process_footprint_bytes(0) == 0
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_footprint_bytes(child.pid) == 0
    assert process_footprint_bytes(child.pid, platform="darwin", phys_footprint=lambda p: None) == 0

