"""May another worker start? A pure function of memory, footprints and the fleet.

Rule: with `other = max(0, used - Σ live footprints)` (what the rest of the
machine holds, whether or not the probe's `used` counts our workers), a new
worker fits when `other + Σ live footprints + its footprint + headroom ≤
budget`. Starts are serialized: while a started worker has not yet reported
what it really holds, nobody else starts into memory not yet seen to settle.

Prefix caches are memory that can be given back. A footprint counts a
language-model worker's cache at its full budget; when a candidate does not
fit, the caches of live (READY) workers shrink first, every one by the same
share of its budget (each loses the same fraction of its hits, and none is
emptied while another keeps all of its); if that is not enough, the
candidate starts with its own cache shrunk, down to 0; it is refused only
when it does not fit with every cache at 0. Shrinking live caches and
admitting are two passes: a shrink is settling, like a start, until every
shrunk worker reports holding no more than its new budget, so nobody starts
into memory not yet freed. `restore` gives shrunk budgets back once free
memory exceeds what it gives by a margin. How much a shrink frees is
predicted from what each cache holds (what the probe's `used` can drop by)
as well as from the budgets (what the footprints drop by), so caches are
never shrunk for a candidate that would still not fit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from mpsd.units import format_bytes


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A worker waiting to start (PENDING or REFUSED), with its model's footprint: what admission must find room for.

    cache_bytes: the part of the footprint that is its prefix cache's full budget, which it may start without.
    """

    worker_id: str
    footprint_bytes: int
    cache_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class LiveCache:
    """A READY worker's prefix cache: the budget admission counts it at now, and what the worker last reported."""

    worker_id: str
    budget_bytes: int           # what its footprint counts now: the full budget less what it was shrunk by
    full_bytes: int             # its model's configured budget: what a restore gives back up to
    held_bytes: int = 0         # PrefixCacheStats.bytes: what it holds
    reported_budget_bytes: int = 0  # PrefixCacheStats.budget_bytes: the budget it has applied

    @property
    def pending(self) -> bool:
        """Shrunk, and the worker has not yet shown it holds no more than the new budget."""
        return self.budget_bytes < self.full_bytes and max(self.held_bytes, self.reported_budget_bytes) > self.budget_bytes


@dataclasses.dataclass(frozen=True)
class Decision:
    """Admission's answer for one candidate; `reason` carries the numbers, for status and the log.

    A candidate gets none while another start settles, or when it would fit
    but another was admitted first; it waits as it was for the next pass.
    `shrink` (worker id -> new budget) comes with admit False: live caches
    shrink for it now, and it is admitted on a later pass once they have.
    `cache_budget_bytes` is its own cache's budget when admitted with it
    shrunk; None: its full budget.
    """

    worker_id: str
    admit: bool
    reason: str
    shrink: Mapping[str, int] = dataclasses.field(default_factory=dict)
    cache_budget_bytes: int | None = None

    @property
    def refused(self) -> bool:
        return not self.admit and not self.shrink


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
           settling: str | None, caches: Sequence[LiveCache] = ()) -> list[Decision]:
    """Acts for at most one candidate (the first that can fit), refuses those that cannot fit with every cache at 0,
    leaves the rest waiting. `caches`: the live workers' prefix caches, whose budgets live_footprints count."""
    if settling is not None or any(c.pending for c in caches):
        return []
    room = _Room(memory, live_footprints, caches)
    free, floor = room.free, room.free_after(room.reclaimable)
    decisions: list[Decision] = []
    acted = False
    for candidate in candidates:
        if candidate.footprint_bytes - candidate.cache_bytes > floor:
            decisions.append(Decision(candidate.worker_id, False, _refuse_reason(candidate, free, memory, floor)))
        elif not acted:
            decision = _make_room(candidate, room, memory)
            decisions.append(decision)
            acted = True
            own_shrink = 0 if decision.cache_budget_bytes is None else candidate.cache_bytes - decision.cache_budget_bytes
            taken = candidate.footprint_bytes - own_shrink
            free, floor = free - taken, floor - taken
    return decisions


def reclaimable_bytes(memory: MemoryView, live_footprints: Sequence[int], caches: Sequence[LiveCache]) -> int:
    """How much more room there would be with every live prefix cache at 0: what demand counts before evicting."""
    room = _Room(memory, live_footprints, caches)
    return max(room.free_after(room.reclaimable) - room.free, 0)


def restore(memory: MemoryView, live_footprints: Sequence[int], caches: Sequence[LiveCache],
            settling: str | None) -> dict[str, int]:
    """Shrunk budgets given back (worker id -> new budget), shared as shrinks are, out of free memory above a margin.

    The margin (that of an OOM retry: free memory wanders) stays free, and a
    partial give-back smaller than it is not worth a change; nothing is given
    back while a start or a shrink settles. Giving back never makes a refused
    candidate admissible: what it moves from free to the caches, shrinking
    could take again, so admission and restore do not undo each other.
    """
    if settling is not None or any(c.pending for c in caches):
        return {}
    shrunk = [c for c in caches if c.budget_bytes < c.full_bytes]
    missing = sum(c.full_bytes - c.budget_bytes for c in shrunk)
    margin = restore_margin(memory.budget_bytes)
    # What live caches may still fill up to their budgets is counted as used: a probe whose `used` outweighs the
    # footprints does not see a budget given back until the cache fills it, and must not give it out twice.
    slack = sum(max(0, c.budget_bytes - c.held_bytes) for c in caches)
    filled = dataclasses.replace(memory, used_bytes=memory.used_bytes + slack)
    give = min(missing, free_bytes(filled, live_footprints) - margin)
    if not shrunk or give <= 0 or give < min(missing, margin):
        return {}
    if give == missing:
        return {c.worker_id: c.full_bytes for c in shrunk}
    return {c.worker_id: c.budget_bytes + (c.full_bytes - c.budget_bytes) * give // missing for c in shrunk}


def restore_margin(budget_bytes: int) -> int:
    return max(OOM_RETRY_MIN_GAIN_BYTES, budget_bytes // 100)


class _Room:
    """Free memory now, and predicted after live caches shrink by a total, shared in proportion to their budgets.

    free = budget - headroom - max(used, Σ live): shrinking lowers Σ live by
    what it takes from the budgets, and `used` by what the caches held above
    their new budgets.
    """

    def __init__(self, memory: MemoryView, live_footprints: Sequence[int], caches: Sequence[LiveCache]) -> None:
        self.memory, self.live = memory, sum(live_footprints)
        self.caches = [c for c in caches if c.budget_bytes > 0]
        self.reclaimable = sum(c.budget_bytes for c in self.caches)
        self.free = free_bytes(memory, live_footprints)

    def takes(self, total: int) -> dict[str, int]:
        if total <= 0:
            return {}
        return {c.worker_id: min(c.budget_bytes, -(-total * c.budget_bytes // self.reclaimable)) for c in self.caches}

    def free_after(self, total: int) -> int:
        takes = self.takes(total)
        # Only a cache given a lower budget lets go of anything (one holding more than a budget left as it is does not).
        released = sum(max(0, c.held_bytes - (c.budget_bytes - takes[c.worker_id])) for c in self.caches if takes)
        live, used = self.live - sum(takes.values()), self.memory.used_bytes - released
        return self.memory.budget_bytes - self.memory.headroom_bytes - max(used, live)

    def least_shrink(self, footprint_bytes: int) -> int | None:
        """The smallest total to take from live caches after which footprint_bytes fits; None if none will do."""
        if self.free_after(self.reclaimable) < footprint_bytes:
            return None
        low, high = 0, self.reclaimable
        while low < high:
            middle = (low + high) // 2
            if self.free_after(middle) >= footprint_bytes:
                high = middle
            else:
                low = middle + 1
        return low


def _make_room(candidate: Candidate, room: _Room, memory: MemoryView) -> Decision:
    """For a candidate that fits with every cache at 0: admit it, shrink live caches for it, or admit it with its own
    cache shrunk (once live caches are at 0)."""
    if candidate.footprint_bytes <= room.free:
        return Decision(candidate.worker_id, True, _admit_reason(candidate, room.free, memory))
    total = room.least_shrink(candidate.footprint_bytes)
    if total is None:
        total = room.reclaimable  # all of them, and then its own cache
    if total > 0:
        takes = room.takes(total)
        shrink = {c.worker_id: c.budget_bytes - takes[c.worker_id] for c in room.caches if takes[c.worker_id]}
        reason = _room_reason(candidate, room, memory, sum(takes.values()), len(shrink))
        return Decision(candidate.worker_id, False, reason, shrink)
    own = candidate.cache_bytes - (candidate.footprint_bytes - room.free)
    reason = (f"{_admit_reason(candidate, room.free, memory)}; its prefix cache shrunk to {format_bytes(own)} of "
              f"{format_bytes(candidate.cache_bytes)}")
    return Decision(candidate.worker_id, True, reason, cache_budget_bytes=own)


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


def _refuse_reason(candidate: Candidate, free: int, memory: MemoryView, floor: int) -> str:
    reason = (f"needs {format_bytes(candidate.footprint_bytes)}, {format_bytes(max(free, 0))} free of "
              f"{format_bytes(memory.budget_bytes)} budget after {format_bytes(memory.headroom_bytes)} headroom")
    if floor - free < OOM_RETRY_MIN_GAIN_BYTES and not candidate.cache_bytes:
        return reason  # caches too small to change the picture are not worth a clause
    own = f" and its own {format_bytes(candidate.cache_bytes)} left out" if candidate.cache_bytes else ""
    short = candidate.footprint_bytes - candidate.cache_bytes - max(floor, 0)
    return (f"{reason}; with every prefix cache at 0 ({format_bytes(max(floor, 0))} free{own}) still "
            f"{format_bytes(short)} short")


def _room_reason(candidate: Candidate, room: _Room, memory: MemoryView, total: int, workers: int) -> str:
    return (f"making room: {workers} live prefix cache{'s' if workers != 1 else ''} shrink by {format_bytes(total)} "
            f"(needs {format_bytes(candidate.footprint_bytes)}, {format_bytes(max(room.free, 0))} free of "
            f"{format_bytes(memory.budget_bytes)} budget after {format_bytes(memory.headroom_bytes)} headroom)")
