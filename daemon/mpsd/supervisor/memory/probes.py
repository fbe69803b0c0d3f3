"""Memory probes: what the machine can hold, per device, behind one interface.

A probe reports every device it sees (memory/snapshot.py), each with budget
(the ceiling workers may use), used and available, in the currency that runs
out first there: wired memory on a Mac (Metal buffers are wired: one unified
device), device memory on each NVIDIA GPU, RAM for CPU workers. The file
probe (memory/file_probe.py) reads numbers a person or a test writes, the
honest stand-in for a Mac's wired memory or several GPUs on machines that
have none.

The daemon must never import torch or mlx (they would claim Metal/CUDA in the
supervisor), so every figure here comes from the OS: psutil, sysctl, libproc,
NVML. What only Metal knows (the recommended working set) a worker reports.
See docs/macos.md, "Memory", and docs/multi-gpu.md.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psutil

from mpsd.config import MemoryConfig
from mpsd.supervisor.memory.file_probe import FileMemoryProbe
from mpsd.supervisor.memory.nvml_probe import NvmlMemoryProbe, nvml_available
from mpsd.supervisor.memory.snapshot import MemoryProbe, MemorySnapshot, ProbeError
from mpsd.units import format_bytes

__all__ = ["CombinedProbe", "FileMemoryProbe", "HostMemoryProbe", "MacMemoryProbe", "MemoryProbe", "MemorySnapshot",
           "NvmlMemoryProbe", "ProbeError", "apply_overrides", "make_probe", "nvml_available"]

GiB = 1024**3
MiB = 1024**2

SYSCTL = "/usr/sbin/sysctl"
WIRED_LIMIT_SYSCTL = "iogpu.wired_limit_mb"

WorkingSetSource = Callable[[], int | None]
SysctlReader = Callable[[str], int | None]


# --- host -----------------------------------------------------------------


class HostMemoryProbe:
    """Host RAM: the ceiling for CPU workers on Linux."""

    name = "host"

    def __init__(self, virtual_memory: Callable[[], Any] = psutil.virtual_memory) -> None:
        self._virtual_memory = virtual_memory

    def snapshot(self) -> MemorySnapshot:
        vm = self._virtual_memory()
        detail = f"{format_bytes(vm.total)} RAM"
        return MemorySnapshot(self.name, vm.total, vm.total - vm.available, vm.available, detail, device="cpu")

    def devices(self) -> tuple[MemorySnapshot, ...]:
        return (self.snapshot(),)


# --- macOS ----------------------------------------------------------------


def read_sysctl_int(name: str, *, run: Callable[..., Any] = subprocess.run) -> int | None:
    """Integer sysctl, or None; a missing key or tool must not fail a status call."""
    try:
        result = run([SYSCTL, "-n", name], capture_output=True, text=True, timeout=2.0, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    try:
        return int(result.stdout.strip())
    except ValueError:
        return None


class ReportedWorkingSet:
    """Holds the Metal recommended working set as last reported by a worker.

    Only a process that opened a Metal device can read that figure, and the
    daemon must not; so a worker reports it and the daemon stores it here.
    An instance is a callable suitable for make_probe(working_set_bytes=...).
    """

    def __init__(self) -> None:
        self._bytes: int | None = None

    def set(self, value: int | None) -> None:
        self._bytes = value if value and value > 0 else None

    def __call__(self) -> int | None:
        return self._bytes


def estimated_working_set(total_ram: int) -> int:
    """Metal's rule of thumb when nobody has told us: ~2/3 of RAM on small Macs, 3/4 on large."""
    return total_ram * 2 // 3 if total_ram < 64 * GiB else total_ram * 3 // 4


class MacMemoryProbe:
    """Wired memory against the GPU wired ceiling (Apple silicon).

    Metal buffers are wired, so wired memory is what runs out first. The
    ceiling is, in order: iogpu.wired_limit_mb when set (> 0); the Metal
    recommended working set as a worker reported it; an estimate from RAM.
    """

    name = "macos"

    def __init__(
        self,
        sysctl_int: SysctlReader = read_sysctl_int,
        virtual_memory: Callable[[], Any] = psutil.virtual_memory,
        working_set_bytes: WorkingSetSource = lambda: None,
    ) -> None:
        self._sysctl_int = sysctl_int
        self._virtual_memory = virtual_memory
        self._working_set_bytes = working_set_bytes

    def snapshot(self) -> MemorySnapshot:
        vm = self._virtual_memory()
        wired = getattr(vm, "wired", None)
        if wired is None:
            raise ProbeError("macos memory probe: psutil reports no wired memory on this system")
        budget, detail = self._budget(vm.total)
        return MemorySnapshot(self.name, budget, wired, max(budget - wired, 0), detail, device="mps")

    def devices(self) -> tuple[MemorySnapshot, ...]:
        return (self.snapshot(),)  # unified memory: GPU and CPU workers draw on the same wired ceiling

    def _budget(self, total_ram: int) -> tuple[int, str]:
        limit_mb = self._sysctl_int(WIRED_LIMIT_SYSCTL)
        if limit_mb is not None and limit_mb > 0:
            return limit_mb * MiB, f"{WIRED_LIMIT_SYSCTL}={limit_mb}"
        reported = self._working_set_bytes()
        if isinstance(reported, int) and reported > 0:
            return reported, "Metal recommended working set (worker report)"
        budget = estimated_working_set(total_ram)
        share = "2/3" if total_ram < 64 * GiB else "3/4"
        return budget, f"estimated {share} of {format_bytes(total_ram)} RAM (no wired limit, no worker report yet)"


# --- several -------------------------------------------------------------


class CombinedProbe:
    """Several probes' devices as one list: the GPUs NVML sees and host RAM for CPU workers beside them."""

    def __init__(self, *parts: MemoryProbe) -> None:
        self._parts = parts
        self.name = "+".join(part.name for part in parts)

    def devices(self) -> tuple[MemorySnapshot, ...]:
        return tuple(snapshot for part in self._parts for snapshot in part.devices())


# --- choice and overrides -------------------------------------------------


def make_probe(
    config: MemoryConfig,
    *,
    platform: str = sys.platform,
    working_set_bytes: WorkingSetSource = lambda: None,
    nvml_available: Callable[[], bool] = nvml_available,
) -> MemoryProbe:
    """The probe named in [memory] probe; "auto" picks what runs out first here."""
    probe = config.probe
    if probe.startswith("file:"):
        return FileMemoryProbe(pathlib.Path(probe[5:]))
    if probe == "host":
        return HostMemoryProbe()
    if probe == "macos":
        return MacMemoryProbe(working_set_bytes=working_set_bytes)
    if probe == "nvml":
        return CombinedProbe(NvmlMemoryProbe(), HostMemoryProbe())
    if probe.startswith("nvml:"):
        return NvmlMemoryProbe(_gpu_index(probe))
    if probe == "auto":
        return _auto_probe(platform, working_set_bytes, nvml_available)
    raise ProbeError(f"unknown memory probe {probe!r} (auto, host, macos, nvml, nvml:N, file:PATH)")


def _auto_probe(platform: str, working_set_bytes: WorkingSetSource, nvml_ok: Callable[[], bool]) -> MemoryProbe:
    if platform == "darwin":
        return MacMemoryProbe(working_set_bytes=working_set_bytes)
    if nvml_ok():
        return CombinedProbe(NvmlMemoryProbe(), HostMemoryProbe())
    return HostMemoryProbe()


def _gpu_index(probe: str) -> int:
    text = probe.partition(":")[2]
    if not text.isdigit():
        raise ProbeError(f"memory probe {probe!r}: GPU index must be a number, as in nvml:1")
    return int(text)


def apply_overrides(snapshot: MemorySnapshot, config: MemoryConfig) -> MemorySnapshot:
    """[memory] budget (or its device's [memory.devices] budget) replaces what the probe says the ceiling is;
    headroom is left to admission so status shows the machine's own figures."""
    budget = config.budget_for(snapshot.device)
    if budget is None:
        return snapshot
    available = max(budget - snapshot.used_bytes, 0)
    own = any(d.device == snapshot.device and d.budget_bytes is not None for d in config.devices)
    table = f'[memory.devices."{snapshot.device}"]' if own else "[memory]"
    note = f"budget from {table} budget (probe said {format_bytes(snapshot.budget_bytes)})"
    detail = f"{snapshot.detail}; {note}" if snapshot.detail else note
    return dataclasses.replace(snapshot, budget_bytes=budget, available_bytes=available, detail=detail)
