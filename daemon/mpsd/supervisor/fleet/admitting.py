"""The admission pass: each tick, waiting workers are placed on a device and admitted, refused or kept waiting.

A part the fleet composes. It reads memory once per pass (FleetDevices),
gives an OOM worker one more try per real change in memory (on its own
device, or on another eligible one that now holds it), places every PENDING
and REFUSED worker (memory/placement.py), and asks the pure admission
decision once per device with that device's figures, live workers, caches
and settling start, so starts on different GPUs do not wait for each other.
It changes states only through the fleet's door (`transition`) and starts
processes only through `spawn`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mpsd.supervisor.fleet.cache_budgets import CacheBudgets
from mpsd.supervisor.fleet.devices import FleetDevices, Looks, Placement
from mpsd.supervisor.fleet.records import Transition, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory import admission
from mpsd.units import format_bytes

WAITING = (WorkerState.PENDING, WorkerState.REFUSED)


class AdmissionPass:
    def __init__(self, workers: Mapping[str, WorkerRecord], *, devices: FleetDevices, caches: CacheBudgets,
                 footprint_of: Callable[[WorkerRecord], int], transition: Transition,
                 spawn: Callable[[WorkerRecord, str], None], blocked: Callable[[str], str]) -> None:
        self._workers = workers
        self._devices = devices
        self._caches = caches
        self._footprint_of = footprint_of
        self._transition = transition
        self._spawn = spawn
        self._blocked = blocked  # why demand could make no room for a model, for its refusal

    def settling(self, device: str, looks: Looks) -> str | None:
        """A started worker on the device not yet READY: memory there not yet seen to settle."""
        return next((w.id for w in self._workers.values() if w.state == WorkerState.STARTING
                     and self._devices.device_of(w, looks) == device), None)

    def run(self) -> None:
        if not any(w.state in (*WAITING, WorkerState.OOM) for w in self._workers.values()):
            return
        looks = self._devices.read()
        if looks is None:
            for worker in self._workers.values():
                if worker.state == WorkerState.PENDING:
                    self._transition(worker, WorkerState.REFUSED, f"memory probe failed: {self._devices.error}")
            return
        self._retry_ooms(looks)
        for device, group in self._place(looks).items():
            self._admit_on(device, group, looks)

    def _place(self, looks: Looks) -> dict[str, list[tuple[WorkerRecord, Placement]]]:
        """device -> its waiting workers with their placements, in the fleet's order."""
        floors = {d: self._devices.free_bytes(d, looks) + self._caches.reclaimable(d, looks) for d in looks}
        planned: dict[str, int] = {}  # what this pass already placed on each device, so the next goes elsewhere
        planned_replicas: dict[tuple[str, str], int] = {}
        groups: dict[str, list[tuple[WorkerRecord, Placement]]] = {}
        for worker in [w for w in self._workers.values() if w.state in WAITING]:
            footprint = self._footprint_of(worker)
            cache = self._caches.candidate(worker, footprint).cache_bytes
            placed = self._devices.place(worker, looks, footprint, cache, floors, planned, planned_replicas)
            if not placed.device:
                self._refuse(worker, placed.why)
                continue
            worker.device = placed.device
            planned[placed.device] = planned.get(placed.device, 0) + footprint
            key = (worker.model.name, placed.device)
            planned_replicas[key] = planned_replicas.get(key, 0) + 1
            groups.setdefault(placed.device, []).append((worker, placed))
        return groups

    def _admit_on(self, device: str, group: list[tuple[WorkerRecord, Placement]], looks: Looks) -> None:
        look = looks[device]
        candidates = [self._caches.candidate(w, self._footprint_of(w)) for w, _ in group]
        placements = {w.id: placed for w, placed in group}
        live = self._devices.live_footprints(device, looks)
        for decision in admission.decide(look.view, live, candidates, self.settling(device, looks),
                                         self._caches.live(device, looks)):
            self._apply(self._workers[decision.worker_id], decision, placements[decision.worker_id])

    def _apply(self, worker: WorkerRecord, decision: admission.Decision, placed: Placement) -> None:
        """Admitted: it starts (with its own cache's budget); live caches shrinking for it: it waits PENDING."""
        reason = placed.say(decision.reason, admitted=decision.admit or bool(decision.shrink))
        self._caches.apply(decision, worker)
        if decision.admit:
            if worker.state == WorkerState.REFUSED:
                self._transition(worker, WorkerState.PENDING, "memory freed; " + reason)
            self._spawn(worker, reason)
        elif decision.shrink:
            self._transition(worker, WorkerState.PENDING, reason)
        else:
            self._refuse(worker, reason)

    def _refuse(self, worker: WorkerRecord, reason: str) -> None:
        blocked = self._blocked(worker.model.name)
        self._transition(worker, WorkerState.REFUSED, f"{reason}; {blocked}" if blocked else reason)

    def _retry_ooms(self, looks: Looks) -> None:
        """One new attempt per real change in memory, never a loop into the same wall; or at once where another
        device it may use holds it now."""
        for worker in self._workers.values():
            if worker.state != WorkerState.OOM:
                continue
            footprint, (device, free) = self._footprint_of(worker), self._devices.free_around(worker, looks)
            budget = looks[device].view.budget_bytes if device in looks else 0
            elsewhere = next((d for d, room in self._devices.eligible_free(worker, looks)
                              if d != device and room >= footprint), None)
            if admission.oom_retry_due(free, worker.free_at_oom, footprint, budget):
                where = f" on {device}" if len(looks) > 1 else ""
                self._transition(worker, WorkerState.PENDING,
                                 f"memory freed ({format_bytes(max(free, 0))} free{where} now); trying once more")
            elif elsewhere:
                self._transition(worker, WorkerState.PENDING, f"{elsewhere} has room for it; trying there")
                worker.device = elsewhere
