"""Prefix cache budgets: what admission may shrink, what each worker is told, and the note status shows.

A part the fleet composes. A language-model worker's footprint counts its
prefix cache at the full budget its config gives it; admission
(`memory/admission.py`) may shrink live workers' caches to make room, or
start a worker with its own cache shrunk, and later give budgets back. This
part turns those decisions into the records: `WorkerRecord.prefix_cache_budget`
(None: as configured) and `prefix_cache_note` (why, with the numbers), and
tells a live worker its new budget at once (`send_budget`, a Stats call). The
health probe carries the budget on every Stats request too (`requested_budget`),
so a budget lost with a failed call reaches the worker on the next probe, and a
new worker's shrunk budget reaches it with its first probe, before it serves.
Caches shrink and grow back per device: only a cache on the device a
candidate waits for makes room for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mpsd.supervisor.fleet.devices import FleetDevices, Looks
from mpsd.supervisor.fleet.records import WorkerRecord
from mpsd.supervisor.fleet.states import PROCESS_STATES, WorkerState
from mpsd.supervisor.memory import admission
from mpsd.supervisor.memory.footprint import Footprint
from mpsd.units import format_bytes

FOR_ROOM = "room for worker {}"
OWN_SHRINK = "the machine's memory could not hold it"
GIVEN_BACK = "partly given back as memory freed"


def requested_budget(worker: WorkerRecord) -> int | None:
    """What a Stats request carries: the budget the daemon set (no more than the worker resolved its cache to), or
    its configured budget while it still runs another one (a restore), else None (it keeps what it has)."""
    cache = worker.stats.prefix_cache if worker.stats is not None else None
    if worker.prefix_cache_budget is not None:
        if cache is not None and cache.configured_bytes:
            return min(worker.prefix_cache_budget, cache.configured_bytes)
        return worker.prefix_cache_budget
    if cache is not None and cache.budget_bytes != cache.configured_bytes:
        return cache.configured_bytes
    return None


class CacheBudgets:
    """The fleet's prefix cache budgets; handed the records, the footprints and the doors it reads and sends through."""

    def __init__(self, workers: Mapping[str, WorkerRecord], *, footprints: Mapping[str, Footprint],
                 send_budget: Callable[[WorkerRecord], None], devices: FleetDevices,
                 settling: Callable[[str, Looks], str | None]) -> None:
        self._workers = workers
        self._footprints = footprints
        self._send_budget = send_budget
        self._devices = devices
        self._settling = settling

    def full_bytes(self, worker: WorkerRecord) -> int:
        """Its model's prefix cache at the full budget: the part of the model's footprint that may shrink."""
        footprint = self._footprints.get(worker.model.name)
        return footprint.cache_bytes if footprint is not None else 0

    def shrunk_by(self, worker: WorkerRecord) -> int:
        """How much less than its model's footprint the worker is counted at, its cache being shrunk."""
        if worker.prefix_cache_budget is None:
            return 0
        return max(0, self.full_bytes(worker) - worker.prefix_cache_budget)

    def live(self, device: str, looks: Looks) -> list[admission.LiveCache]:
        """READY workers' caches on the device, as admission sees them: what may shrink, and whether a shrink has
        taken effect."""
        caches = []
        for worker in self._workers.values():
            full = self.full_bytes(worker)
            if worker.state != WorkerState.READY or not full or self._devices.device_of(worker, looks) != device:
                continue
            reported = worker.stats.prefix_cache if worker.stats is not None else None
            caches.append(admission.LiveCache(
                worker.id, full - self.shrunk_by(worker), full, reported.bytes if reported else 0,
                reported.budget_bytes if reported else 0))
        return caches

    def candidate(self, worker: WorkerRecord, footprint_bytes: int) -> admission.Candidate:
        return admission.Candidate(worker.id, footprint_bytes, min(self.full_bytes(worker), footprint_bytes))

    def apply(self, decision: admission.Decision, worker: WorkerRecord) -> None:
        """The shrinks a decision makes for `worker`, and its own budget when it is admitted."""
        for worker_id, budget in decision.shrink.items():
            self._set(self._workers[worker_id], budget, FOR_ROOM.format(worker.id))
        if decision.admit:
            self._set(worker, decision.cache_budget_bytes, OWN_SHRINK)

    def reclaimable(self, device: str, looks: Looks) -> int:
        """What shrinking every live cache on the device to 0 would add to its free memory: demand's room before it
        evicts anyone, and placement's where a worker fits only so."""
        look = looks.get(device)
        if look is None:
            return 0
        return admission.reclaimable_bytes(look.view, self._devices.live_footprints(device, looks),
                                           self.live(device, looks))

    def give_back(self) -> None:
        """Forgets budgets of workers with no process, and gives shrunk budgets back as admission's `restore` allows.

        Nothing is given back while a worker waits PENDING: admission acts on it
        at the next pass, and the room a shrink just made is its (a shrink the
        worker had already applied, its cache being smaller, settles at once)."""
        for worker in self._workers.values():
            if worker.prefix_cache_budget is not None and worker.state not in PROCESS_STATES:
                worker.prefix_cache_budget, worker.prefix_cache_note = None, ""
        if not any(w.prefix_cache_budget is not None for w in self._workers.values()):
            return  # nothing shrunk: no memory read
        looks = self._devices.read()
        if looks is None:
            return
        waiting = next((w.id for w in self._workers.values() if w.state == WorkerState.PENDING), None)
        for device, look in looks.items():
            settling = self._settling(device, looks) or waiting
            given = admission.restore(look.view, self._devices.live_footprints(device, looks),
                                      self.live(device, looks), settling)
            for worker_id, budget in given.items():
                self._set(self._workers[worker_id], budget, GIVEN_BACK)

    def _set(self, worker: WorkerRecord, budget: int | None, why: str) -> None:
        full = self.full_bytes(worker)
        if budget is None or budget >= full:
            worker.prefix_cache_budget, worker.prefix_cache_note = None, ""
        else:
            worker.prefix_cache_budget = budget
            # Status and the page show it after "prefix cache: ".
            worker.prefix_cache_note = f"shrunk to {format_bytes(budget)} of {format_bytes(full)} configured: {why}"
        if worker.state == WorkerState.READY:
            self._send_budget(worker)
