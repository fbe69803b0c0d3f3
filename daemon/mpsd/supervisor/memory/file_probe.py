"""The file probe: memory figures a person or a test writes, re-read on every look.

The honest stand-in for what this machine cannot have (a Mac's wired memory,
four GPUs). One device:

    {"budget_bytes": 100, "used_bytes": 30}

or several, each with its own figures (names as workers' devices are written:
"cuda:0", "cpu", "mps"):

    {"devices": [{"device": "cuda:0", "budget_bytes": 80000000000, "used_bytes": 0}, ...]}

`available_bytes` may be given; otherwise it is budget - used, never below 0.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from mpsd.supervisor.memory.snapshot import DEFAULT_DEVICE, MemorySnapshot, ProbeError

DEVICE_KEYS = ("device", "budget_bytes", "used_bytes", "available_bytes")


class FileMemoryProbe:
    """Re-reads its file on every look, so a test (or a person) can change what the daemon sees while it runs."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.name = f"file:{self.path}"

    def devices(self) -> tuple[MemorySnapshot, ...]:
        data = self._read()
        if "devices" not in data:
            return (self._device(data, "", DEFAULT_DEVICE),)
        listed = data["devices"]
        if not isinstance(listed, list) or not listed:
            raise ProbeError(f"memory file {self.path}: devices must be a non-empty list of objects")
        snapshots = tuple(self._listed(entry, i) for i, entry in enumerate(listed))
        names = [s.device for s in snapshots]
        if len(set(names)) != len(names):
            raise ProbeError(f"memory file {self.path}: device names repeat: {', '.join(names)}")
        return snapshots

    def _listed(self, entry: Any, index: int) -> MemorySnapshot:
        where = f"devices[{index}]."
        if not isinstance(entry, dict):
            raise ProbeError(f"memory file {self.path}: devices[{index}] must be an object, got {entry!r}")
        unknown = sorted(set(entry) - set(DEVICE_KEYS))
        if unknown:
            raise ProbeError(f"memory file {self.path}: {where}{unknown[0]}: unknown key (known: {', '.join(DEVICE_KEYS)})")
        name = entry.get("device")
        if not isinstance(name, str) or not name:
            raise ProbeError(f"memory file {self.path}: {where}device must be a name such as \"cuda:0\", got {name!r}")
        return self._device(entry, where, name)

    def _device(self, data: dict[str, Any], where: str, name: str) -> MemorySnapshot:
        budget = self._size(data, where, "budget_bytes")
        used = self._size(data, where, "used_bytes")
        available = self._size(data, where, "available_bytes") if "available_bytes" in data else max(budget - used, 0)
        return MemorySnapshot(self.name, budget, used, available, device=name)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ProbeError(f"memory file {self.path}: cannot read it ({exc.strerror or exc})") from exc
        except ValueError as exc:
            raise ProbeError(f"memory file {self.path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ProbeError(f"memory file {self.path}: expected a JSON object, got {type(data).__name__}")
        return data

    def _size(self, data: dict[str, Any], where: str, key: str) -> int:
        if key not in data:
            raise ProbeError(f"memory file {self.path}: missing key {where}{key!r}" if not where
                             else f"memory file {self.path}: {where}{key}: missing")
        value = data[key]
        # bool is an int subclass; true/false is a typo, not a size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProbeError(f"memory file {self.path}: {where}{key} must be an integer number of bytes, got {value!r}")
        if value < 0:
            raise ProbeError(f"memory file {self.path}: {where}{key} cannot be negative, got {value}")
        return value
