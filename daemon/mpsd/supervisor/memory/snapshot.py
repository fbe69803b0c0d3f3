"""What a memory probe reports: one snapshot per device it sees, in the currency that runs out first there."""

from __future__ import annotations

import dataclasses
from typing import Protocol

DEFAULT_DEVICE = "default"  # a one-device file probe's device: every worker counts against it


class ProbeError(ValueError):
    """A probe could not read its source; callers show the message as is."""


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    """One device's memory: budget (the ceiling workers may use), used and available.

    device names a worker's device as its config writes it ("cuda:1", "cpu",
    "mps"), so placement can match models to devices; utilization and
    temperature are the driver's (NVML), None where it gives none.
    """

    probe: str
    budget_bytes: int
    used_bytes: int
    available_bytes: int
    detail: str = ""
    device: str = DEFAULT_DEVICE
    utilization_percent: int | None = None
    temperature_c: int | None = None


class MemoryProbe(Protocol):
    name: str

    def devices(self) -> tuple[MemorySnapshot, ...]:
        """Every device it sees, each read now; never empty (a probe that cannot read raises ProbeError)."""
