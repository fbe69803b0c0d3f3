"""The operator's door into the fleet: scale, restart, drain and reload.

A part of `Fleet` (a mixin it inherits) kept in its own file: these methods
change workers only through the fleet's own `_transition`, `_stop_worker`
and `_add_model`, on the event loop, like every other cause. What a reload
changes is decided by the pure `plan_reload`.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable

from mpsd.config import Config, ModelConfig
from mpsd.supervisor.states import PROCESS_STATES, WorkerState
from mpsd.supervisor.worker_record import AfterStop, WorkerRecord


class ControlError(Exception):
    """An operator command that cannot be done; the message says why."""


class Change(str, enum.Enum):
    REMOVED = "removed"
    ADDED = "added"
    REPLACED = "replaced"    # anything but the replica count changed: its workers are replaced
    RESCALED = "rescaled"    # only the replica count changed: its workers are kept


@dataclasses.dataclass(frozen=True)
class ModelChange:
    change: Change
    name: str
    model: ModelConfig | None  # the new config; None when removed


def plan_reload(old: dict[str, ModelConfig], new: Iterable[ModelConfig]) -> list[ModelChange]:
    """Removals first (they free memory for what is added), then the new config's models in its order."""
    fresh = {m.name: m for m in new}
    plan = [ModelChange(Change.REMOVED, name, None) for name in old if name not in fresh]
    for name, model in fresh.items():
        before = old.get(name)
        if before is None:
            plan.append(ModelChange(Change.ADDED, name, model))
        elif dataclasses.replace(before, replicas=model.replicas) != model:
            plan.append(ModelChange(Change.REPLACED, name, model))
        elif before.replicas != model.replicas:
            plan.append(ModelChange(Change.RESCALED, name, model))
    return plan


class OperatorCommands:
    """Fleet methods for operator commands; each returns the sentence the operator sees."""

    def scale(self, model_name: str, replicas: int) -> str:
        if model_name not in self.models:
            raise ControlError(f"no model named {model_name!r} (configured: {', '.join(sorted(self.models))})")
        current = [w for w in self.workers_of(model_name) if w.after_stop != AfterStop.REMOVE]
        self.models[model_name] = dataclasses.replace(self.models[model_name], replicas=replicas)
        if replicas > len(current):
            added = [self._add_worker(self.models[model_name]).id for _ in range(replicas - len(current))]
            return f"{model_name}: {len(current)} -> {replicas} replicas; added {', '.join(added)}"
        retired = sorted(current, key=lambda w: _index(w.id))[replicas:]
        for worker in retired:
            self._stop_worker(worker, "scaled down", after=AfterStop.REMOVE)
        names = ", ".join(w.id for w in retired) or "none"
        return f"{model_name}: {len(current)} -> {replicas} replicas; stopping {names}"

    def restart_worker(self, worker_id: str) -> str:
        worker = self._worker(worker_id)
        if worker.state in PROCESS_STATES:
            if worker.state == WorkerState.DRAINING:
                worker.after_stop = AfterStop.RESTART
                return f"{worker_id} is already draining; it will start again once stopped"
            self._stop_worker(worker, "restart requested by operator", after=AfterStop.RESTART)
            return f"{worker_id}: draining pid {worker.process.pid}; a fresh worker starts once it has stopped"
        worker.failure_times, worker.consecutive_failures = [], 0
        if worker.state != WorkerState.PENDING:
            self._transition(worker, WorkerState.PENDING, "restart requested by operator; waiting for admission")
        return f"{worker_id}: was {worker.reason}; now waiting for admission"

    def drain_worker(self, worker_id: str) -> str:
        worker = self._worker(worker_id)
        if worker.state in (WorkerState.STOPPED, WorkerState.DRAINING):
            raise ControlError(f"{worker_id} is already {worker.state.value}")
        self._stop_worker(worker, "drained by operator", after=AfterStop.STAY)
        return f"{worker_id}: draining; it finishes its requests in flight and stays STOPPED"

    def apply_config(self, new: Config) -> str:
        """Reload: adds, removes and resizes models; workers of unchanged models are not touched.

        [daemon] keeps its values until the next start (timings, restart policy
        and ports are read once), as the reload's answer tells the operator.
        """
        changes = [self._apply_change(step) for step in plan_reload(self.models, new.models)]
        self.config = dataclasses.replace(new, daemon=self.config.daemon, models=tuple(self.models.values()))
        return "; ".join(changes) or "no model changed"

    def _apply_change(self, step: ModelChange) -> str:
        if step.change == Change.RESCALED:
            return self.scale(step.name, step.model.replicas)
        if step.change in (Change.REMOVED, Change.REPLACED):
            why = "model removed from config" if step.change == Change.REMOVED else "model config changed; replacing"
            for worker in self.workers_of(step.name):
                self._stop_worker(worker, why, after=AfterStop.REMOVE)
        if step.change == Change.REMOVED:
            del self.models[step.name]
            return f"removed {step.name}"
        self._add_model(step.model)  # a replaced model keeps its place in the order
        return f"added {step.name} ({step.model.replicas} replicas)" if step.change == Change.ADDED else f"replaced {step.name}"

    def _worker(self, worker_id: str) -> WorkerRecord:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise ControlError(f"no worker {worker_id!r} (workers: {', '.join(self.workers)})")
        return worker


def _index(worker_id: str) -> int:
    return int(worker_id.rpartition("-")[2])
