"""The operator's door into the fleet: scale, restart, drain, reload, and which process `mpsctl logs` reads.

A part the fleet composes, not a base it inherits: it is handed the fleet's
models and workers and the fleet's own doors for changing them (`transition`,
`add_worker`, `add_model`, `stop_worker`), so it runs on the event loop like
every other cause and is tested alone with fakes of those doors. What a reload
changes is decided by the pure `plan_reload`; the fleet keeps its own config.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable, Mapping, MutableMapping

from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.process import WorkerProcess
from mpsd.supervisor.fleet.records import AfterStop, Transition, WorkerRecord, staying, workers_of
from mpsd.supervisor.fleet.states import PROCESS_STATES, WorkerState


class ControlError(Exception):
    """An operator command that cannot be done; the message says why."""


class Change(str, enum.Enum):
    REMOVED = "removed"
    ADDED = "added"
    REPLACED = "replaced"    # what its workers run changed: they are replaced
    RESCALED = "rescaled"    # only how many and when (DEMAND_FIELDS) changed: its workers are kept


# What decides how many workers a model has, not what they run: changing these keeps its workers.
DEMAND_FIELDS = ("replicas", "min_replicas", "max_replicas", "keep_alive_s", "priority", "scale_up_queue")


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
        elif dataclasses.replace(before, **{f: getattr(model, f) for f in DEMAND_FIELDS}) != model:
            plan.append(ModelChange(Change.REPLACED, name, model))
        elif before != model:
            plan.append(ModelChange(Change.RESCALED, name, model))
    return plan


class OperatorCommands:
    """The operator's commands; each returns the sentence the operator sees, or raises ControlError saying why not."""

    def __init__(self, models: MutableMapping[str, ModelConfig], workers: Mapping[str, WorkerRecord], *,
                 transition: Transition, add_worker: Callable[[ModelConfig], WorkerRecord],
                 add_model: Callable[[ModelConfig], None],
                 stop_worker: Callable[[WorkerRecord, str, AfterStop], None]) -> None:
        self._models = models
        self._workers = workers
        self._transition = transition
        self._add_worker = add_worker
        self._add_model = add_model
        self._stop_worker = stop_worker

    def scale(self, model_name: str, replicas: int, min_replicas: int | None = None,
              max_replicas: int | None = None) -> str:
        """Workers now. Without bounds, a static model (min = max) stays static at the new count and a demand-driven
        one widens its bounds to include it (an operator may pin below min_replicas)."""
        if model_name not in self._models:
            raise ControlError(f"no model named {model_name!r} (configured: {', '.join(sorted(self._models))})")
        current = staying(self._workers.values(), model_name)
        model = self._models[model_name]
        static = model.min_replicas == model.max_replicas and min_replicas is None and max_replicas is None
        low = replicas if static else min(model.min_replicas if min_replicas is None else min_replicas, replicas)
        high = replicas if static else max(model.max_replicas if max_replicas is None else max_replicas, replicas)
        if min_replicas is not None and min_replicas > high or max_replicas is not None and max_replicas < low:
            raise ControlError(f"{model_name}: min_replicas {low} .. max_replicas {high} cannot hold {replicas} replicas")
        self._models[model_name] = dataclasses.replace(model, replicas=replicas, min_replicas=low, max_replicas=high)
        if replicas > len(current):
            added = [self._add_worker(self._models[model_name]).id for _ in range(replicas - len(current))]
            return f"{model_name}: {len(current)} -> {replicas} replicas; added {', '.join(added)}"
        retired = sorted(current, key=lambda w: _index(w.id))[replicas:]
        for worker in retired:
            self._stop_worker(worker, "scaled down", AfterStop.REMOVE)
        names = ", ".join(w.id for w in retired) or "none"
        return f"{model_name}: {len(current)} -> {replicas} replicas; stopping {names}"

    def restart_worker(self, worker_id: str) -> str:
        worker = self._worker(worker_id)
        if worker.state in PROCESS_STATES:
            if worker.state == WorkerState.DRAINING:
                worker.after_stop = AfterStop.RESTART
                return f"{worker_id} is already draining; it will start again once stopped"
            self._stop_worker(worker, "restart requested by operator", AfterStop.RESTART)
            return f"{worker_id}: draining pid {worker.process.pid}; a fresh worker starts once it has stopped"
        worker.failure_times, worker.consecutive_failures, was = [], 0, worker.reason
        if worker.state != WorkerState.PENDING:
            self._transition(worker, WorkerState.PENDING, "restart requested by operator; waiting for admission")
        return f"{worker_id}: was {was}; now waiting for admission"

    def drain_worker(self, worker_id: str) -> str:
        worker = self._worker(worker_id)
        if worker.state in (WorkerState.STOPPED, WorkerState.DRAINING):
            raise ControlError(f"{worker_id} is already {worker.state.value}")
        self._stop_worker(worker, "drained by operator", AfterStop.STAY)
        return f"{worker_id}: draining; it finishes its requests in flight and stays STOPPED"

    def log_source(self, worker_id: str) -> WorkerProcess | None:
        """The process whose stderr `mpsctl logs` shows: the worker's current one (None before its first start)."""
        return self._worker(worker_id).process

    def reload(self, models: Iterable[ModelConfig]) -> str:
        """Adds, removes and resizes models as the new config has them; workers of unchanged models are not touched."""
        return "; ".join(self._apply_change(step) for step in plan_reload(self._models, models)) or "no model changed"

    def _apply_change(self, step: ModelChange) -> str:
        if step.change == Change.RESCALED:
            return self._retune(step.model)
        if step.change in (Change.REMOVED, Change.REPLACED):
            why = "model removed from config" if step.change == Change.REMOVED else "model config changed; replacing"
            for worker in workers_of(self._workers.values(), step.name):
                self._stop_worker(worker, why, AfterStop.REMOVE)
        if step.change == Change.REMOVED:
            del self._models[step.name]
            return f"removed {step.name}"
        self._add_model(step.model)  # a replaced model keeps its place in the order
        return f"added {step.name} ({step.model.replicas} replicas)" if step.change == Change.ADDED else f"replaced {step.name}"

    def _retune(self, model: ModelConfig) -> str:
        """New bounds keep the workers; a static model goes to its new count, a demand-driven one into its bounds."""
        held = len(staying(self._workers.values(), model.name))
        self._models[model.name] = model
        target = model.replicas if model.min_replicas == model.max_replicas else min(max(held, model.min_replicas),
                                                                                      model.max_replicas)
        if target != held:
            message = self.scale(model.name, target)
            self._models[model.name] = dataclasses.replace(model, replicas=target)
            return message
        return f"retuned {model.name} (min {model.min_replicas}, max {model.max_replicas})"

    def _worker(self, worker_id: str) -> WorkerRecord:
        worker = self._workers.get(worker_id)
        if worker is None:
            raise ControlError(f"no worker {worker_id!r} (workers: {', '.join(self._workers)})")
        return worker


def _index(worker_id: str) -> int:
    return int(worker_id.rpartition("-")[2])
