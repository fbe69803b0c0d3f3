"""Memory probes: what the machine can hold, behind one interface.

A snapshot is budget (the ceiling workers may wire), used and available.
The file probe reads numbers a person or a test writes, the honest stand-in
for a Mac's wired memory on machines that have none.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import psutil

from mpsd.config import MemoryConfig


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    probe: str
    budget_bytes: int
    used_bytes: int
    available_bytes: int


class HostMemoryProbe:
    """Host RAM: the ceiling for CPU workers on Linux."""

    name = "host"

    def snapshot(self) -> MemorySnapshot:
        vm = psutil.virtual_memory()
        return MemorySnapshot(self.name, vm.total, vm.total - vm.available, vm.available)


class FileMemoryProbe:
    """JSON {"budget_bytes": .., "used_bytes": ..}; available is derived when absent."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self.name = f"file:{path}"

    def snapshot(self) -> MemorySnapshot:
        data = json.loads(self.path.read_text(encoding="utf-8"))
        budget, used = int(data["budget_bytes"]), int(data["used_bytes"])
        available = int(data.get("available_bytes", max(budget - used, 0)))
        return MemorySnapshot(self.name, budget, used, available)


def make_probe(config: MemoryConfig):
    if config.probe.startswith("file:"):
        return FileMemoryProbe(pathlib.Path(config.probe[5:]))
    return HostMemoryProbe()


def apply_overrides(snapshot: MemorySnapshot, config: MemoryConfig) -> MemorySnapshot:
    """[memory] budget replaces what the probe says the ceiling is."""
    if config.budget_bytes is None:
        return snapshot
    available = max(config.budget_bytes - snapshot.used_bytes, 0)
    return dataclasses.replace(snapshot, budget_bytes=config.budget_bytes, available_bytes=available)


def process_footprint_bytes(pid: int) -> int:
    """Resident memory of a worker as the OS sees it; 0 if it is gone."""
    if not pid:
        return 0
    try:
        return psutil.Process(pid).memory_info().rss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0
