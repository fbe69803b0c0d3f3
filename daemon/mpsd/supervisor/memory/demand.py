"""Memory moves to where the demand is: who should be loaded, as a pure decision.

Given each model's demand (queued requests, its bounds and priority), each
worker's load (in flight, when it was last used, how long it has been READY),
the room admission sees and the clock, `decide` returns actions; the fleet
applies them. It starts a worker when requests wait (one at a time per model,
with a cooldown, up to max_replicas), stops workers idle past keep_alive down
to min_replicas, and, when a model must start a worker that does not fit,
evicts idle workers of other models (lower priority first, then least
recently used) until it fits. It never evicts a busy worker, a model at its
min_replicas, or a worker READY for less than min_residency: a request
alternating between two models faster than that must not thrash them.
Decisions use learned footprints and the live probe (the caller's free
figure), never file sizes alone. Prefix caches are room before any eviction:
the caller's reclaimable figure (what shrinking every live cache to 0 would
free, as admission predicts it) counts first, and the needy model's own cache
is not needed to start it (admission starts it with that cache shrunk), so a
worker is evicted only when shrinking caches cannot make enough room.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from mpsd.units import format_bytes, format_duration

SCALE_UP_COOLDOWN_S = 5.0  # after a start on demand, before the next one for the same model


@dataclasses.dataclass(frozen=True)
class ModelDemand:
    name: str
    min_replicas: int
    max_replicas: int
    keep_alive_s: float | None   # None: idle workers are never stopped
    priority: int
    scale_up_queue: int
    footprint_bytes: int
    queued: int                  # requests waiting for a slot now
    workers: int                 # workers it holds (any state but leaving)
    starting: bool               # one is waiting for admission or loading: start no other yet
    failed: bool                 # one gave up (FATAL): demand must not start a load loop
    last_start_at: float | None  # when demand last started a worker for it
    cache_bytes: int = 0         # the part of footprint_bytes that is its prefix cache's full budget


@dataclasses.dataclass(frozen=True)
class WorkerLoad:
    id: str
    model: str
    ready: bool
    inflight: int
    ready_since: float
    idle_since: float            # when its last request ended (or it became READY)
    device: str = ""             # the device its memory is on: only a worker on the needy device makes room there


@dataclasses.dataclass(frozen=True)
class Start:
    """One more worker for a model: PENDING until admission finds it room."""

    model: str
    queued: int  # the requests waiting for it

    @property
    def reason(self) -> str:
        return f"started on demand: {self.queued} queued"


@dataclasses.dataclass(frozen=True)
class Stop:
    """A worker to drain and remove: idle past keep_alive, or evicted to make room."""

    worker_id: str
    reason: str
    evicted_for: str = ""        # the model it made room for; "" when it was idle past keep_alive


@dataclasses.dataclass(frozen=True)
class Blocked:
    """A model that needs room and cannot get it now; the sentence goes into its refusal."""

    model: str
    reason: str


Action = Start | Stop | Blocked


def decide(models: Sequence[ModelDemand], workers: Sequence[WorkerLoad], free_bytes: int, waiting: Sequence[str],
           now: float, min_residency_s: float, evicting: bool, reclaimable_bytes: int = 0,
           device: str | None = None) -> list[Action]:
    """waiting: models whose next worker admission refused for memory; evicting: a stop for room is under way;
    reclaimable_bytes: what shrinking every live prefix cache to 0 would add to free_bytes; device: the device
    free_bytes is of (the waiting workers'), whose workers alone are evicted for them (None: one device)."""
    by_name = {m.name: m for m in models}
    actions: list[Action] = [a for m in models if (a := _scale_up(m, now))]
    actions += _idle_stops(by_name, workers, now)
    stopping = {a.worker_id for a in actions if isinstance(a, Stop)}
    for name in waiting:
        needy = by_name[name]
        if evicting or needy.queued == 0 and needy.workers > needy.min_replicas:
            continue  # no request waits for it any more: evict nobody for a load that lost its reason
        there = [w for w in workers if device is None or w.device == device]
        actions += _make_room(needy, by_name, there, free_bytes, reclaimable_bytes, now, min_residency_s, stopping)
    return actions


def _scale_up(model: ModelDemand, now: float) -> Start | None:
    if model.queued == 0 or model.starting or model.failed or model.workers >= model.max_replicas:
        return None
    if model.workers and model.queued < model.scale_up_queue * model.workers:
        return None
    if model.workers and model.last_start_at is not None and now - model.last_start_at < SCALE_UP_COOLDOWN_S:
        return None  # the cooldown paces scaling up; a model with no worker at all has nothing to wait for
    return Start(model.name, model.queued)


def _idle_stops(models: dict[str, ModelDemand], workers: Sequence[WorkerLoad], now: float) -> list[Stop]:
    stops = []
    for model in models.values():
        if model.keep_alive_s is None or model.queued:
            continue
        idle = sorted((w for w in workers if w.model == model.name and w.ready and not w.inflight
                       and now - w.idle_since >= model.keep_alive_s), key=lambda w: w.idle_since)
        for worker in idle[:max(model.workers - model.min_replicas, 0)]:
            stops.append(Stop(worker.id, f"stopped: idle {format_duration(now - worker.idle_since)}"))
    return stops


def _make_room(needy: ModelDemand, models: dict[str, ModelDemand], workers: Sequence[WorkerLoad], free_bytes: int,
               reclaimable_bytes: int, now: float, min_residency_s: float, stopping: set[str]) -> list[Action]:
    """Evicts the fewest idle workers, lowest priority then least recently used, that make the footprint fit.

    Room is free memory plus what live caches can give back; the needy model
    needs its footprint without its own cache. An evicted worker adds its
    footprint without its cache: that part was counted as reclaimable already.
    """
    candidates, blockers = [], []
    spare = {name: m.workers - m.min_replicas for name, m in models.items()}
    for worker in sorted(workers, key=lambda w: (models[w.model].priority, w.idle_since)):
        if worker.model == needy.name or worker.id in stopping:
            continue
        blocker = _why_kept(worker, models[worker.model], spare, now, min_residency_s)
        if blocker:
            blockers.append(blocker)
            continue
        spare[worker.model] -= 1
        candidates.append(worker)
    chosen, room, need = [], free_bytes + reclaimable_bytes, needy.footprint_bytes - needy.cache_bytes
    for worker in candidates:
        if room >= need:
            break
        chosen.append(worker)
        room += models[worker.model].footprint_bytes - models[worker.model].cache_bytes
    if room < need:
        # With no other model's worker in the way, admission's numbers say all there is to say.
        return [Blocked(needy.name, f"nothing evictable ({', '.join(blockers)})")] if blockers else []
    caches = f", {format_bytes(reclaimable_bytes)} more in prefix caches" if reclaimable_bytes else ""
    why = (f"evicted for model {needy.name} (needs {format_bytes(needy.footprint_bytes)}, "
           f"{format_bytes(max(free_bytes, 0))} free{caches})")
    return [Stop(w.id, why, evicted_for=needy.name) for w in chosen]


def _why_kept(worker: WorkerLoad, model: ModelDemand, spare: dict[str, int], now: float,
              min_residency_s: float) -> str:
    """Why a worker cannot be evicted, in the words status shows; "" when it can."""
    if not worker.ready:
        return f"{worker.id} loading"
    if worker.inflight or model.queued:
        return f"{worker.id} busy"
    resident = now - worker.ready_since
    if resident < min_residency_s:
        return f"{worker.id} resident {format_duration(resident)} < {format_duration(min_residency_s)}"
    if spare[worker.model] <= 0:
        return f"{worker.id} at min_replicas {model.min_replicas}"
    return ""
