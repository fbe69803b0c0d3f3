"""One read-only picture of the fleet, which status and metrics both render.

The fleet builds it in one place (`Fleet.snapshot`), so "free for workers",
each worker's measured memory and the per-model counts are computed once and
read the same way by every reader; readers never reach into the fleet's own
records, which only the fleet may change.
"""

from __future__ import annotations

import dataclasses

from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.records import AfterStop, ModelCounts, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.footprint import Footprint
from mpsd.supervisor.memory.probes import MemorySnapshot
from mpsd.supervisor.memory.process_memory import NO_MEMORY, ProcessMemory, shared_part
from mpsd.v1 import worker_pb2


@dataclasses.dataclass(frozen=True)
class MemoryReading:
    """The probe read when the snapshot was taken; `snapshot` is None when it failed and `error` says why."""

    probe: str
    headroom_bytes: int
    snapshot: MemorySnapshot | None
    error: str
    free_for_workers_bytes: int  # room for one more worker after other use, live workers and headroom; never < 0


@dataclasses.dataclass(frozen=True)
class ModelView:
    """A model that is configured, or was and still has workers stopping or counts to report (config None)."""

    name: str
    config: ModelConfig | None
    footprint_bytes: int
    footprint_source: str
    counts: ModelCounts
    desired: int = 0        # workers it holds (any state but leaving): what demand wants now
    live: int = 0           # of those, READY
    last_change: str = ""   # the last start or stop demand made for it, with why
    shared_bytes: int = 0   # clean file-backed pages its workers map (mostly its weights), counted once
    shared_by: int = 0      # how many of its workers map such pages


@dataclasses.dataclass(frozen=True)
class WorkerView:
    id: str
    model: str
    state: WorkerState
    reason: str
    state_age_s: float
    uptime_s: float  # 0 when it has no process
    pid: int
    restarts: int
    memory_bytes: int  # what its process tree holds as the OS sees it, clean file pages left out; 0 without one
    stats: worker_pb2.WorkerStats | None
    last_exit: str
    stderr_tail: tuple[str, ...]
    prefix_cache_note: str = ""  # why its prefix cache is shrunk ("shrunk to … configured: …"); "" if not
    process_memory: ProcessMemory = NO_MEMORY  # its process tree's figures in full; memory_bytes is their footprint


@dataclasses.dataclass(frozen=True)
class FleetSnapshot:
    memory: MemoryReading
    models: tuple[ModelView, ...]  # configured ones in config order, then the others
    workers: tuple[WorkerView, ...]

    def workers_of(self, model_name: str) -> list[WorkerView]:
        return [w for w in self.workers if w.model == model_name]


def view_worker(worker: WorkerRecord, now: float, memory: ProcessMemory) -> WorkerView:
    pid = worker.pid
    return WorkerView(
        id=worker.id, model=worker.model.name, state=worker.state, reason=worker.reason,
        state_age_s=now - worker.state_since, uptime_s=(now - worker.started_at) if pid else 0.0, pid=pid,
        restarts=worker.restarts, memory_bytes=memory.footprint, stats=worker.stats, last_exit=worker.last_exit,
        stderr_tail=tuple(worker.stderr_tail), prefix_cache_note=worker.prefix_cache_note, process_memory=memory,
    )


def view_models(configured: dict[str, ModelConfig], footprints: dict[str, Footprint],
                counts: dict[str, ModelCounts], workers: list[WorkerRecord],
                last_change: dict[str, str], views: tuple[WorkerView, ...] = ()) -> tuple[ModelView, ...]:
    """Configured models first; a removed one stays while it has workers stopping or counts to report.

    A model's clean shared pages are counted once, from its workers' views (`shared_part`)."""
    names = list(configured) + sorted((set(counts) | {w.model.name for w in workers}) - set(configured))
    held = [w for w in workers if w.after_stop != AfterStop.REMOVE]
    shared = {name: shared_part(v.process_memory for v in views if v.model == name) for name in names}
    return tuple(
        ModelView(name=name, config=configured.get(name),
                  footprint_bytes=footprints[name].bytes if name in footprints else 0,
                  footprint_source=footprints[name].source if name in footprints else "",
                  counts=dataclasses.replace(counts.get(name, ModelCounts())),
                  desired=sum(w.model.name == name for w in held),
                  live=sum(w.model.name == name and w.state == WorkerState.READY for w in held),
                  last_change=last_change.get(name, ""), shared_bytes=shared[name][0], shared_by=shared[name][1])
        for name in names)
