"""The demand door into the fleet: starts on demand, idle stops and evictions, applied each tick.

A part the fleet composes, not a base it inherits. It reads what the router
knows of each model (queued requests, in-flight counts, when each worker was
last busy) through an injected `load_of`, asks the pure `demand.decide`, and
applies its actions only through the doors the fleet hands it: a start adds a
PENDING worker that admission then admits, a stop drains a worker and removes
it, a block is kept for the fleet's admission to explain a refusal with. It
never changes a worker's state itself, so it is tested alone with fakes of
those doors and no memory probe. Room is per device: the free memory on the
device the refused worker waits for, plus what shrinking live prefix caches
there would give back (`room`); only workers on that device are evicted for
it, and eviction is the last resort.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.records import AfterStop, ModelCounts, WorkerRecord, staying, workers_of
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory import demand
from mpsd.supervisor.memory.footprint import Footprint

log = logging.getLogger("mpsd.fleet")
# A worker in one of these may still come to serve: demand starts no other worker of its model meanwhile.
ON_ITS_WAY = frozenset({WorkerState.PENDING, WorkerState.REFUSED, WorkerState.STARTING, WorkerState.BACKOFF,
                        WorkerState.OOM})


class ModelLoad(Protocol):
    """What the router knows of a model's traffic (router.ModelPool)."""

    queued: int

    def inflight(self, worker_id: str) -> int: ...

    def idle_since(self, worker_id: str) -> float | None: ...


class NoLoad:
    queued = 0

    def inflight(self, worker_id: str) -> int:
        return 0

    def idle_since(self, worker_id: str) -> float | None:
        return None


class DemandBalancer:
    """Moves workers to where the requests are, and says why a model's requests wait."""

    def __init__(self, models: Mapping[str, ModelConfig], workers: Mapping[str, WorkerRecord], *,
                 load_of: Callable[[str], ModelLoad | None], footprints: Mapping[str, Footprint],
                 count: Callable[[str], ModelCounts], add_worker: Callable[[ModelConfig, str], WorkerRecord],
                 stop_worker: Callable[[WorkerRecord, str, AfterStop], None],
                 room: Callable[[str], tuple[int, int]], stopping: Callable[[], bool]) -> None:
        self._models = models
        self._workers = workers
        self._load_of = load_of
        self._footprints = footprints
        self._count = count
        self._add_worker = add_worker
        self._stop_worker = stop_worker
        self._room = room  # device -> (free bytes, what shrinking live prefix caches there would add)
        self._stopping = stopping
        self._last_start: dict[str, float] = {}   # model -> when demand last started a worker for it
        self._last_change: dict[str, str] = {}    # model -> the last start or stop demand made, for status
        self._blocked: dict[str, str] = {}        # model -> why no room can be made for it now

    @property
    def last_changes(self) -> Mapping[str, str]:
        """Per model, the last start or stop demand made and why, for status."""
        return self._last_change

    def blocked(self, model_name: str) -> str:
        """Why no room could be made for the model at the last balance; "" when nothing blocked it."""
        return self._blocked.get(model_name, "")

    def prospects(self, model_name: str) -> str | None:
        """None while a worker of the model may still serve (live, coming, or demand may start one); else why not."""
        workers = staying(self._workers.values(), model_name)
        if any(w.state in ON_ITS_WAY | {WorkerState.READY} for w in workers):
            return None
        failed = next((w for w in workers if w.state == WorkerState.FATAL), None)
        if failed:
            return f"{failed.id} gave up: {failed.reason}"
        model = self._models.get(model_name)
        if model is None or self._stopping() or len(workers) >= model.max_replicas:
            return "none is coming"
        return None

    def why_waiting(self, model_name: str) -> str:
        """Why the model's queued requests cannot be served now: its next worker refused for memory, with the numbers
        and what holds the memory; "" while nothing stops a load."""
        refused = next((w for w in workers_of(self._workers.values(), model_name)
                        if w.state == WorkerState.REFUSED), None)
        return refused.reason if refused else ""

    def balance(self, now: float, min_residency_s: float) -> None:
        """One pass of demand: decides from the loads and room now, and applies every action."""
        loads = {name: self._load_of(name) or NoLoad() for name in self._models}
        models = [self._demand_of(model, loads[name]) for name, model in self._models.items()]
        ready = [self._load_view(w, loads[w.model.name]) for w in self._workers.values()
                 if w.state == WorkerState.READY and w.model.name in loads and w.after_stop == AfterStop.STAY]
        refused = [w for w in self._workers.values() if w.state == WorkerState.REFUSED]
        device = refused[0].device if refused else ""  # one device a pass: evicting elsewhere makes no room there
        waiting = sorted({w.model.name for w in refused if w.device == device})
        free, reclaimable = self._room(device) if waiting else (0, 0)
        evicting = any(w.evicted_for and w.state == WorkerState.DRAINING for w in self._workers.values())
        self._blocked = {}
        for action in demand.decide(models, ready, free, waiting, now, min_residency_s, evicting, reclaimable,
                                    device=device):
            self._apply(action, now)

    def _demand_of(self, model: ModelConfig, load: ModelLoad) -> demand.ModelDemand:
        workers = staying(self._workers.values(), model.name)
        return demand.ModelDemand(
            name=model.name, min_replicas=model.min_replicas, max_replicas=model.max_replicas,
            keep_alive_s=model.keep_alive_s, priority=model.priority, scale_up_queue=model.scale_up_queue,
            footprint_bytes=self._footprints[model.name].bytes, queued=load.queued, workers=len(workers),
            starting=any(w.state in ON_ITS_WAY for w in workers),
            failed=any(w.state == WorkerState.FATAL for w in workers), last_start_at=self._last_start.get(model.name),
            cache_bytes=self._footprints[model.name].cache_bytes)

    @staticmethod
    def _load_view(worker: WorkerRecord, load: ModelLoad) -> demand.WorkerLoad:
        idle_since = load.idle_since(worker.id)
        return demand.WorkerLoad(worker.id, worker.model.name, True, load.inflight(worker.id), worker.ready_at,
                                 worker.ready_at if idle_since is None else max(idle_since, worker.ready_at),
                                 worker.device)

    def _apply(self, action: demand.Action, now: float) -> None:
        if isinstance(action, demand.Blocked):
            self._blocked[action.model] = action.reason
            return
        if isinstance(action, demand.Start):
            worker = self._add_worker(self._models[action.model], f"{action.reason}; waiting for admission")
            self._last_start[action.model] = now
            self._count(action.model).demand_starts += 1
            self._note_change(worker, action.reason)
            return
        worker = self._workers[action.worker_id]
        worker.evicted_for = action.evicted_for
        counts = self._count(worker.model.name)
        if action.evicted_for:
            counts.evictions += 1
        else:
            counts.idle_stops += 1
        self._note_change(worker, action.reason)
        self._stop_worker(worker, action.reason, AfterStop.REMOVE)

    def _note_change(self, worker: WorkerRecord, reason: str) -> None:
        """The last start or stop demand made for a model, for status; one log line per decision."""
        self._last_change[worker.model.name] = f"{worker.id} {reason}"
        log.info("demand: %s %s", worker.id, reason, extra={"worker": worker.id, "model": worker.model.name})
