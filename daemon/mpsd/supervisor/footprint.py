"""How much memory one more worker of a model will hold: configured, learned or estimated.

A configured footprint is the operator's word and wins. Without one, what
running workers reported wins over the estimate from the model's file size.
An out-of-memory death proves the model needs more than was believed, so the
learned figure is raised past it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

FILE_SIZE_FACTOR = 1.2             # weights plus activations and allocator slack
PROCESS_OVERHEAD_BYTES = 256 << 20  # interpreter, torch and gRPC before any weights
DEFAULT_MODULE_ESTIMATE_BYTES = 512 << 20
OOM_RAISE_FACTOR = 1.25
# Backend figures that say what a worker wired on its device (see worker backends/memory.py).
DEVICE_PEAK_KEYS = ("cuda_max_reserved", "mps_driver_allocated", "mlx_peak")


@dataclasses.dataclass
class Footprint:
    estimated_bytes: int
    configured_bytes: int | None = None
    learned_bytes: int = 0

    @property
    def bytes(self) -> int:
        if self.configured_bytes is not None:
            return self.configured_bytes
        return self.learned_bytes or self.estimated_bytes

    @property
    def source(self) -> str:
        if self.configured_bytes is not None:
            return "configured"
        return "learned" if self.learned_bytes else "estimated"

    def observe(self, peak_bytes: int) -> None:
        self.learned_bytes = max(self.learned_bytes, peak_bytes)

    def raise_after_oom(self, observed_peak_bytes: int) -> None:
        """The worker died needing more than we believed: at least its peak, and past what we had."""
        self.learned_bytes = max(self.learned_bytes, observed_peak_bytes, int(self.bytes * OOM_RAISE_FACTOR))


def worker_peak_bytes(process_bytes: int, backend_memory: dict[str, int]) -> int:
    """What one worker holds: its process footprint or its device peak, whichever is larger."""
    device = max((backend_memory.get(key, 0) for key in DEVICE_PEAK_KEYS), default=0)
    return max(process_bytes, device)


def estimate_bytes(model_path: str | None) -> int:
    """Files on disk times a factor, plus the process's own overhead; a guess until workers report."""
    if not model_path:
        return DEFAULT_MODULE_ESTIMATE_BYTES
    return int(_tree_size(pathlib.Path(model_path)) * FILE_SIZE_FACTOR) + PROCESS_OVERHEAD_BYTES


def _tree_size(path: pathlib.Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (pathlib.Path(root) / name).stat().st_size
            except OSError:
                pass
    return total
