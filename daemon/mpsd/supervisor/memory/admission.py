"""May another worker start? A pure function of memory, footprints and the fleet.

Rule: with `other = max(0, used - Σ live footprints)` (what the rest of the
machine holds, whether or not the probe's `used` counts our workers), a new
worker fits when `other + Σ live footprints + its footprint + headroom ≤
budget`. Starts are serialized: while a started worker has not yet reported
what it really holds, nobody else starts into memory not yet seen to settle.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mpsd.units import format_bytes


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A worker waiting to start (PENDING or REFUSED), with its model's footprint: what admission must find room for."""

    worker_id: str
    footprint_bytes: int


@dataclasses.dataclass(frozen=True)
class Decision:
    """Admission's answer for one candidate; `reason` carries the numbers, for status and the log.

    A candidate gets none while another start settles, or when it would fit
    but another was admitted first; it waits as it was for the next pass.
    """

    worker_id: str
    admit: bool
    reason: str


@dataclasses.dataclass(frozen=True)
class MemoryView:
    """The probe's figures and the configured headroom: all admission needs to know of the machine."""

    budget_bytes: int
    used_bytes: int
    headroom_bytes: int


def free_bytes(memory: MemoryView, live_footprints: Sequence[int]) -> int:
    """Room left for new workers after the rest of the machine, our live workers and headroom."""
    live = sum(live_footprints)
    other = max(0, memory.used_bytes - live)
    return memory.budget_bytes - memory.headroom_bytes - other - live


def decide(memory: MemoryView, live_footprints: Sequence[int], candidates: Sequence[Candidate],
           settling: str | None) -> list[Decision]:
    """Admits at most one candidate (the first that fits), refuses those that cannot fit, leaves the rest waiting."""
    if settling is not None:
        return []
    free = free_bytes(memory, live_footprints)
    decisions: list[Decision] = []
    admitted = False
    for candidate in candidates:
        fits = candidate.footprint_bytes <= free
        if fits and not admitted:
            decisions.append(Decision(candidate.worker_id, True, _admit_reason(candidate, free, memory)))
            free -= candidate.footprint_bytes
            admitted = True
        elif not fits:
            decisions.append(Decision(candidate.worker_id, False, _refuse_reason(candidate, free, memory)))
    return decisions


OOM_RETRY_MIN_GAIN_BYTES = 64 << 20


def oom_retry_due(free: int, free_at_oom: int, footprint_bytes: int, budget_bytes: int) -> bool:
    """Whether memory has really changed since a worker died of OOM, so one more attempt is not the same wall.

    "Really" is scaled three ways: a tenth of the model's (raised) footprint,
    a hundredth of the budget, and 64 MiB at least. Free memory on a busy
    host wanders by more than 64 MiB within seconds (CI saw it), and the
    wander grows with the machine; a retry on noise is a slow restart loop.
    """
    gain = max(OOM_RETRY_MIN_GAIN_BYTES, footprint_bytes // 10, budget_bytes // 100)
    return free >= free_at_oom + gain


def _admit_reason(candidate: Candidate, free: int, memory: MemoryView) -> str:
    return (f"admitted: needs {format_bytes(candidate.footprint_bytes)}, {format_bytes(max(free, 0))} free of "
            f"{format_bytes(memory.budget_bytes)} budget after {format_bytes(memory.headroom_bytes)} headroom")


def _refuse_reason(candidate: Candidate, free: int, memory: MemoryView) -> str:
    return (f"needs {format_bytes(candidate.footprint_bytes)}, {format_bytes(max(free, 0))} free of "
            f"{format_bytes(memory.budget_bytes)} budget after {format_bytes(memory.headroom_bytes)} headroom")
