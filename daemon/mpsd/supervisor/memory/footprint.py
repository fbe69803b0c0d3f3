"""How much memory one more worker of a model will hold (what a live one holds now: process_memory.py).

That figure (the model's footprint, which admission counts) is
configured, learned or estimated. A configured footprint is the operator's word and wins. Without one, what
running workers reported wins over the estimate from the model's file size.
An out-of-memory death proves the model needs more than was believed, so the
learned figure is raised past it.

A language-model worker's footprint includes its prefix cache at the full
budget its config gives it (`cache_bytes`, a part of `bytes`): the part that
admission may shrink to make room, and that an OOM raise leaves as it is.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

from mpsd.backend_memory import DEVICE_PEAK_KEYS

FILE_SIZE_FACTOR = 1.2             # weights plus activations and allocator slack
PROCESS_OVERHEAD_BYTES = 256 << 20  # interpreter, torch and gRPC before any weights
DEFAULT_MODULE_ESTIMATE_BYTES = 512 << 20
OOM_RAISE_FACTOR = 1.25


@dataclasses.dataclass
class Footprint:
    estimated_bytes: int
    configured_bytes: int | None = None
    learned_bytes: int = 0
    estimated_cache_bytes: int = 0          # the prefix cache's budget as config says, before a worker reported it
    learned_cache_bytes: int | None = None  # the budget workers reported their prefix_cache resolved to

    @property
    def cache_bytes(self) -> int:
        """The part of `bytes` that is the prefix cache at its full budget: what shrinking caches can give back."""
        cache = self.estimated_cache_bytes if self.learned_cache_bytes is None else self.learned_cache_bytes
        return min(cache, self.bytes)

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

    def observe(self, peak_bytes: int, cache_bytes: int | None = None) -> None:
        """peak_bytes: all a worker will hold, its prefix cache's full budget (cache_bytes, when it keeps one) included."""
        self.learned_bytes = max(self.learned_bytes, peak_bytes)
        if cache_bytes is not None:
            self.learned_cache_bytes = max(self.learned_cache_bytes or 0, cache_bytes)

    def raise_after_oom(self, observed_peak_bytes: int) -> None:
        """The worker died needing more than we believed: at least its peak, and past what we had.

        observed_peak_bytes is what it held without its prefix cache; the cache
        is counted once, at its full budget, and not scaled up: it is memory
        the daemon shrinks on demand, not what the model was short of.
        """
        cache = self.cache_bytes
        self.learned_bytes = max(self.learned_bytes, observed_peak_bytes + cache,
                                 int((self.bytes - cache) * OOM_RAISE_FACTOR) + cache)


def worker_peak_bytes(process_bytes: int, backend_memory: dict[str, int]) -> int:
    """What one worker holds: its process footprint or its device peak, whichever is larger."""
    device = max((backend_memory.get(key, 0) for key in DEVICE_PEAK_KEYS), default=0)
    return max(process_bytes, device)


def estimate_bytes(model_path: str | None) -> int:
    """Files on disk times a factor, plus the process's own overhead; a guess until workers report."""
    if not model_path:
        return DEFAULT_MODULE_ESTIMATE_BYTES
    return int(_tree_size(pathlib.Path(model_path)) * FILE_SIZE_FACTOR) + PROCESS_OVERHEAD_BYTES


def estimate_cache_bytes(size_bytes: int | None, fraction: float | None, footprint_bytes: int) -> int:
    """The prefix cache's budget before a worker resolved it: a size as given, else a fraction of the footprint."""
    if size_bytes is not None:
        return size_bytes
    return int(fraction * footprint_bytes) if fraction else 0


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
