"""The demand door into the fleet: starts on demand, idle stops and evictions, applied each tick.

A part of `Fleet` (a mixin it inherits) kept in its own file. It reads what
the router knows of each model (queued requests, in-flight counts, when each
worker was last busy) through an injected `load_of`, asks the pure
`demand.decide`, and applies its actions through the fleet's own doors: a
start adds a PENDING worker that admission then admits, a stop drains a
worker and removes it, a block explains a refusal.
"""

from __future__ import annotations

import logging
from typing import Protocol

from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.records import AfterStop, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory import admission, demand

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
    """Fleet methods that move workers to where the requests are."""

    def prospects(self, model_name: str) -> str | None:
        """None while a worker of the model may still serve (live, coming, or demand may start one); else why not."""
        workers = [w for w in self.workers_of(model_name) if w.after_stop != AfterStop.REMOVE]
        if any(w.state in ON_ITS_WAY | {WorkerState.READY} for w in workers):
            return None
        failed = next((w for w in workers if w.state == WorkerState.FATAL), None)
        if failed:
            return f"{failed.id} gave up: {failed.reason}"
        model = self.models.get(model_name)
        if model is None or self._stopping or len(workers) >= model.max_replicas:
            return "none is coming"
        return None

    def why_waiting(self, model_name: str) -> str:
        """Why the model's queued requests cannot be served now: its next worker refused for memory, with the numbers
        and what holds the memory; "" while nothing stops a load."""
        refused = next((w for w in self.workers_of(model_name) if w.state == WorkerState.REFUSED), None)
        return refused.reason if refused else ""

    def _balance(self, now: float) -> None:
        loads = {name: self._load_of(name) or NoLoad() for name in self.models}
        models = [self._demand_of(model, loads[name], now) for name, model in self.models.items()]
        ready = [self._load_view(w, loads[w.model.name]) for w in self.workers.values()
                 if w.state == WorkerState.READY and w.model.name in loads and w.after_stop == AfterStop.STAY]
        waiting = sorted({w.model.name for w in self.workers.values() if w.state == WorkerState.REFUSED})
        free = 0
        if waiting:
            view = self._read_memory()[0]
            free = admission.free_bytes(view, self.live_footprints()) if view else 0
        evicting = any(w.evicted_for and w.state == WorkerState.DRAINING for w in self.workers.values())
        self._blocked = {}
        actions = demand.decide(models, ready, free, waiting, now, self.config.memory.min_residency_s, evicting)
        for action in actions:
            self._apply_demand(action, now)

    def _demand_of(self, model: ModelConfig, load: ModelLoad, now: float) -> demand.ModelDemand:
        workers = [w for w in self.workers_of(model.name) if w.after_stop != AfterStop.REMOVE]
        return demand.ModelDemand(
            name=model.name, min_replicas=model.min_replicas, max_replicas=model.max_replicas,
            keep_alive_s=model.keep_alive_s, priority=model.priority, scale_up_queue=model.scale_up_queue,
            footprint_bytes=self._footprints[model.name].bytes, queued=load.queued, workers=len(workers),
            starting=any(w.state in ON_ITS_WAY for w in workers),
            failed=any(w.state == WorkerState.FATAL for w in workers), last_start_at=self._last_start.get(model.name))

    @staticmethod
    def _load_view(worker: WorkerRecord, load: ModelLoad) -> demand.WorkerLoad:
        idle_since = load.idle_since(worker.id)
        return demand.WorkerLoad(worker.id, worker.model.name, True, load.inflight(worker.id), worker.ready_at,
                                 worker.ready_at if idle_since is None else max(idle_since, worker.ready_at))

    def _apply_demand(self, action: demand.Action, now: float) -> None:
        if isinstance(action, demand.Blocked):
            self._blocked[action.model] = action.reason
            return
        if isinstance(action, demand.Start):
            worker = self._add_worker(self.models[action.model], f"{action.reason}; waiting for admission")
            self._last_start[action.model] = now
            self._count(action.model).demand_starts += 1
            self._note_change(worker, action.reason)
            return
        worker = self.workers[action.worker_id]
        worker.evicted_for = action.evicted_for
        counts = self._count(worker.model.name)
        if action.evicted_for:
            counts.evictions += 1
        else:
            counts.idle_stops += 1
        self._note_change(worker, action.reason)
        self._stop_worker(worker, action.reason, after=AfterStop.REMOVE)

    def _note_change(self, worker: WorkerRecord, reason: str) -> None:
        """The last start or stop demand made for a model, for status; one log line per decision."""
        self._last_change[worker.model.name] = f"{worker.id} {reason}"
        log.info("demand: %s %s", worker.id, reason, extra={"worker": worker.id, "model": worker.model.name})
