"""One read-only picture of the fleet, which status and metrics both render.

The fleet builds it in one place (`Fleet.snapshot`), so "free for workers",
each worker's measured memory and the per-model counts are computed once and
read the same way by every reader; readers never reach into the fleet's own
records, which only the fleet may change.
"""

from __future__ import annotations

import dataclasses

from mpsd.config import MemoryConfig, ModelConfig
from mpsd.supervisor.fleet.devices import FleetDevices, Looks
from mpsd.supervisor.fleet.records import AfterStop, ModelCounts, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.footprint import Footprint
from mpsd.supervisor.memory.snapshot import MemorySnapshot
from mpsd.supervisor.memory.process_memory import NO_MEMORY, ProcessMemory, shared_part
from mpsd.v1 import worker_pb2


@dataclasses.dataclass(frozen=True)
class DeviceReading:
    """One device at the snapshot: the probe's figures, its headroom, its room, and the workers whose memory is there."""

    snapshot: MemorySnapshot
    headroom_bytes: int
    free_for_workers_bytes: int  # room for one more worker there after other use, live workers and headroom; >= 0
    workers: tuple[str, ...]     # ids of the workers with a process there


@dataclasses.dataclass(frozen=True)
class MemoryReading:
    """The probe read when the snapshot was taken; `snapshot` is None when it failed and `error` says why.

    `snapshot` is the only device's figures, or with several devices their sums
    (device "all"); free_for_workers is then the most room on any one device:
    a worker never spans two."""

    probe: str
    headroom_bytes: int
    snapshot: MemorySnapshot | None
    error: str
    free_for_workers_bytes: int  # room for one more worker after other use, live workers and headroom; never < 0
    devices: tuple[DeviceReading, ...] = ()


def view_memory(probe_name: str, devices: FleetDevices, looks: Looks | None, config: MemoryConfig) -> MemoryReading:
    if looks is None:
        return MemoryReading(probe_name, config.headroom_bytes, None, devices.error, 0)
    readings = tuple(DeviceReading(look.snapshot, look.view.headroom_bytes,
                                   max(devices.free_bytes(name, looks), 0), devices.workers_on(name, looks))
                     for name, look in looks.items())
    free = max(r.free_for_workers_bytes for r in readings)
    if len(readings) == 1:
        return MemoryReading(probe_name, readings[0].headroom_bytes, readings[0].snapshot, "", free, readings)
    total = MemorySnapshot(probe_name, *(sum(getattr(r.snapshot, f) for r in readings)
                                         for f in ("budget_bytes", "used_bytes", "available_bytes")),
                           f"{len(readings)} devices", device="all")
    return MemoryReading(probe_name, sum(r.headroom_bytes for r in readings), total, "", free, readings)


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
    device: str = ""  # the device the daemon placed it on ("" before placement)


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
        device=worker.device,
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
