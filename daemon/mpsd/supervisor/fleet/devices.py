"""The fleet's devices: the probe read per device, what each holds, and where a waiting worker goes.

A part the fleet composes. Each look reads the probe once (`read`): every
device's figures with [memory] overrides applied, and admission's view of it
(its budget, used, and its own headroom). A worker's memory counts on the
device it was placed on (`WorkerRecord.device`); with a one-device probe,
on that device whatever it says. Placement (memory/placement.py) is asked
here with each eligible device's room.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

from mpsd.config import MemoryConfig
from mpsd.supervisor.fleet.records import WorkerRecord
from mpsd.supervisor.fleet.states import PROCESS_STATES
from mpsd.supervisor.memory import admission, placement
from mpsd.supervisor.memory.probes import MemoryProbe, MemorySnapshot, apply_overrides

log = logging.getLogger("mpsd.fleet")


@dataclasses.dataclass(frozen=True)
class DeviceLook:
    """One device at one look: the probe's figures (overrides applied) and admission's view of them."""

    snapshot: MemorySnapshot
    view: admission.MemoryView

    @property
    def name(self) -> str:
        return self.snapshot.device


Looks = Mapping[str, DeviceLook]  # device name -> its look, in the probe's order


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a waiting worker goes: device, and how many it could have used (its reasons name the device when
    the probe sees several); no device: why there is none."""

    device: str
    choices: int = 1
    named: bool = False  # the probe sees several devices: reasons say which
    why: str = ""

    def say(self, reason: str, admitted: bool) -> str:
        if not self.named:
            return reason
        if admitted or self.choices == 1:
            return f"on {self.device}: {reason}"
        return f"no room on any of its {self.choices} devices; most on {self.device}: {reason}"


class FleetDevices:
    """Reads memory per device and accounts the workers on each; handed the records and the doors it reads."""

    def __init__(self, workers: Mapping[str, WorkerRecord], *, probe: Callable[[], MemoryProbe],
                 memory_config: Callable[[], MemoryConfig], counted_bytes: Callable[[WorkerRecord], int]) -> None:
        self._workers = workers
        self._probe = probe
        self._memory_config = memory_config
        self._counted_bytes = counted_bytes  # a live worker's footprint less what its prefix cache was shrunk by
        self.error = ""  # why the last look failed; "" when it did not

    def read(self) -> Looks | None:
        """Every device now, or None when the probe fails (`error` says why, logged once per new error)."""
        probe, config = self._probe(), self._memory_config()
        try:
            snapshots = [apply_overrides(s, config) for s in probe.devices()]
        except (OSError, ValueError, KeyError) as exc:
            if str(exc) != self.error:
                log.warning("memory probe %s failed: %s", probe.name, exc)
            self.error = str(exc)
            return None
        self.error = ""
        return {s.device: DeviceLook(s, admission.MemoryView(s.budget_bytes, s.used_bytes, config.headroom_for(s.device)))
                for s in snapshots}

    @staticmethod
    def device_of(worker: WorkerRecord, looks: Looks) -> str:
        """Where the worker's memory counts: its device, or the only one a one-device probe has."""
        return next(iter(looks)) if len(looks) == 1 else worker.device

    def live_footprints(self, device: str, looks: Looks, excluding: WorkerRecord | None = None) -> list[int]:
        """What admission counts as held on the device: every worker with a process there."""
        return [self._counted_bytes(w) for w in self._workers.values()
                if w.state in PROCESS_STATES and w is not excluding and self.device_of(w, looks) == device]

    def workers_on(self, device: str, looks: Looks) -> tuple[str, ...]:
        return tuple(w.id for w in self._workers.values()
                     if w.state in PROCESS_STATES and self.device_of(w, looks) == device)

    def free_bytes(self, device: str, looks: Looks, excluding: WorkerRecord | None = None) -> int:
        look = looks.get(device)
        return admission.free_bytes(look.view, self.live_footprints(device, looks, excluding)) if look else 0

    def free_around(self, worker: WorkerRecord, looks: Looks) -> tuple[str, int]:
        """The worker's device and the room there leaving it out: what an OOM death is measured against."""
        device = self.device_of(worker, looks)
        return device, self.free_bytes(device, looks, excluding=worker)

    def place(self, worker: WorkerRecord, looks: Looks, footprint_bytes: int, cache_bytes: int,
              floors: Mapping[str, int], planned: Mapping[str, int],
              planned_replicas: Mapping[tuple[str, str], int]) -> Placement:
        """A waiting worker's device. floors: each device's free bytes with every live prefix cache there at 0;
        planned: the bytes this pass already placed on each device (not started, so in no figure yet), and
        planned_replicas the workers, per (model, device)."""
        model = worker.model
        names, why = placement.eligible(model.device, model.devices, list(looks))
        if not names:
            return Placement("", why=why)
        rooms = [placement.DeviceRoom(d, self.free_bytes(d, looks) - planned.get(d, 0),
                                      floors.get(d, 0) - planned.get(d, 0)) for d in names]
        replicas = {d: planned_replicas.get((model.name, d), 0) + sum(
            1 for w in self._workers.values()
            if w.model.name == model.name and w.state in PROCESS_STATES and self.device_of(w, looks) == d)
            for d in names}
        chosen = placement.choose(rooms, footprint_bytes, footprint_bytes - cache_bytes, replicas,
                                  worker.device if worker.device in names else "")
        return Placement(chosen.device, len(names), len(looks) > 1)

    def eligible_free(self, worker: WorkerRecord, looks: Looks) -> list[tuple[str, int]]:
        """(device, free bytes) for each device the worker may use: where an OOM retry could go."""
        names, _ = placement.eligible(worker.model.device, worker.model.devices, list(looks))
        return [(d, self.free_bytes(d, looks, excluding=worker)) for d in names]
