"""OperatorCommands alone: no Fleet, no processes; the fleet's doors are fakes that record what they were asked.

What a command must do is say so to the fleet (add this worker, stop that one
and then remove it, move this one to PENDING) and answer the operator with a
sentence, or refuse with one that names the model or worker.
"""

from __future__ import annotations

import dataclasses
import types

import pytest
from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.commands import ControlError, OperatorCommands
from mpsd.supervisor.fleet.records import AfterStop, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState


def model(name: str = "lm", low: int = 2, high: int = 2, **fields) -> ModelConfig:
    return ModelConfig(name=name, backend="null-lm", replicas=low, min_replicas=low, max_replicas=high, **fields)


class Doors:
    """The fleet as the commands see it: its models and workers, and a record of every door they used."""

    def __init__(self, *models: ModelConfig) -> None:
        self.models: dict[str, ModelConfig] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.stops: list[tuple[str, str, AfterStop]] = []
        self.moves: list[tuple[str, WorkerState]] = []
        self.added_models: list[str] = []
        self.commands = OperatorCommands(self.models, self.workers, transition=self._transition,
                                         add_worker=self._add_worker, add_model=self._add_model,
                                         stop_worker=self._stop_worker)
        for m in models:
            self.models[m.name] = m
            for _ in range(m.replicas):
                self._add_worker(m).state = WorkerState.READY

    def _add_worker(self, m: ModelConfig) -> WorkerRecord:
        index = sum(w.model.name == m.name for w in self.workers.values())
        worker = WorkerRecord(id=f"{m.name}-{index}", model=m)
        self.workers[worker.id] = worker
        return worker

    def _add_model(self, m: ModelConfig) -> None:
        self.added_models.append(m.name)
        self.models[m.name] = m

    def _stop_worker(self, worker: WorkerRecord, reason: str, after: AfterStop) -> None:
        self.stops.append((worker.id, reason, after))
        worker.after_stop = after

    def _transition(self, worker: WorkerRecord, new: WorkerState, reason: str) -> None:
        self.moves.append((worker.id, new))
        worker.state, worker.reason = new, reason


def test_scale_up_adds_workers_and_a_static_model_stays_static_at_the_new_count():
    doors = Doors(model())
    assert doors.commands.scale("lm", 4) == "lm: 2 -> 4 replicas; added lm-2, lm-3"
    m = doors.models["lm"]
    assert (m.replicas, m.min_replicas, m.max_replicas) == (4, 4, 4)
    assert doors.stops == [] and doors.moves == []


def test_scale_down_stops_the_highest_numbered_workers_for_removal_and_counts_only_those_staying():
    doors = Doors(model(low=3, high=3))
    assert doors.commands.scale("lm", 1) == "lm: 3 -> 1 replicas; stopping lm-1, lm-2"
    assert doors.stops == [("lm-1", "scaled down", AfterStop.REMOVE), ("lm-2", "scaled down", AfterStop.REMOVE)]
    assert doors.commands.scale("lm", 1) == "lm: 1 -> 1 replicas; stopping none", "workers on their way out do not count"


def test_a_demand_driven_model_widens_its_bounds_to_the_count_and_may_be_pinned_below_its_minimum():
    doors = Doors(model(low=1, high=3))
    doors.commands.scale("lm", 5)
    assert (doors.models["lm"].min_replicas, doors.models["lm"].max_replicas) == (1, 5)
    doors.commands.scale("lm", 0)
    assert (doors.models["lm"].replicas, doors.models["lm"].min_replicas, doors.models["lm"].max_replicas) == (0, 0, 5)
    doors.commands.scale("lm", 2, min_replicas=1, max_replicas=2)
    assert (doors.models["lm"].min_replicas, doors.models["lm"].max_replicas) == (1, 2)


def test_scale_refuses_unknown_models_and_bounds_that_cannot_hold_the_count():
    doors = Doors(model(), model("other"))
    with pytest.raises(ControlError, match=r"no model named 'nope' \(configured: lm, other\)"):
        doors.commands.scale("nope", 1)
    with pytest.raises(ControlError, match="lm: min_replicas .* cannot hold 2 replicas"):
        doors.commands.scale("lm", 2, min_replicas=5, max_replicas=3)
    assert doors.models["lm"] == model() and len(doors.workers) == 4, "a refused command changes nothing"


def test_restart_of_a_fatal_worker_forgets_its_failures_and_sends_it_to_admission_through_the_door():
    doors = Doors(model(low=1, high=1))
    worker = doors.workers["lm-0"]
    worker.state, worker.failure_times, worker.consecutive_failures = WorkerState.FATAL, [1.0, 2.0], 5
    worker.reason = "boot failure, not retried: no such file"
    message = doors.commands.restart_worker("lm-0")
    assert message == "lm-0: was boot failure, not retried: no such file; now waiting for admission"
    assert doors.moves == [("lm-0", WorkerState.PENDING)] and doors.stops == []
    assert (worker.failure_times, worker.consecutive_failures) == ([], 0)


def test_restart_of_a_live_worker_drains_it_first_and_of_a_draining_one_only_changes_what_follows():
    doors = Doors(model())
    doors.workers["lm-0"].process = types.SimpleNamespace(pid=777)
    assert doors.commands.restart_worker("lm-0") == (
        "lm-0: draining pid 777; a fresh worker starts once it has stopped")
    assert doors.stops == [("lm-0", "restart requested by operator", AfterStop.RESTART)]
    draining = doors.workers["lm-1"]
    draining.state = WorkerState.DRAINING
    assert "already draining" in doors.commands.restart_worker("lm-1")
    assert draining.after_stop == AfterStop.RESTART and len(doors.stops) == 1 and doors.moves == []


def test_drain_stops_a_worker_to_stay_stopped_and_refuses_twice_or_unknown_names():
    doors = Doors(model())
    assert doors.commands.drain_worker("lm-1").startswith("lm-1: draining")
    assert doors.stops == [("lm-1", "drained by operator", AfterStop.STAY)]
    doors.workers["lm-1"].state = WorkerState.STOPPED
    with pytest.raises(ControlError, match="lm-1 is already STOPPED"):
        doors.commands.drain_worker("lm-1")
    with pytest.raises(ControlError, match=r"no worker 'lm-9' \(workers: lm-0, lm-1\)"):
        doors.commands.drain_worker("lm-9")
    with pytest.raises(ControlError, match="no worker 'lm-9'"):
        doors.commands.log_source("lm-9")
    assert doors.commands.log_source("lm-0") is None, "no process before its first start"


def test_reload_removes_adds_replaces_and_retunes_through_the_doors_and_says_what_it_did():
    kept, static, gone, changed = model("kept", 1, 3), model("static"), model("gone", 1, 1), model("changed", 1, 1)
    doors = Doors(kept, static, gone, changed)
    message = doors.commands.reload([dataclasses.replace(kept, max_replicas=4), dataclasses.replace(static, replicas=3,
                                     min_replicas=3, max_replicas=3), dataclasses.replace(changed, concurrency=8),
                                     model("new", 1, 1)])
    assert message == ("removed gone; retuned kept (min 1, max 4); static: 2 -> 3 replicas; added static-2; "
                       "replaced changed; added new (1 replicas)")
    assert doors.stops == [("gone-0", "model removed from config", AfterStop.REMOVE),
                           ("changed-0", "model config changed; replacing", AfterStop.REMOVE)]
    assert doors.added_models == ["changed", "new"] and "gone" not in doors.models
    assert doors.models["kept"].max_replicas == 4 and doors.models["static"].replicas == 3
    assert doors.commands.reload(list(doors.models.values())) == "no model changed"


def test_reload_moves_a_demand_driven_model_into_its_new_bounds():
    doors = Doors(model("lm", 3, 3))
    doors.models["lm"] = model("lm", 1, 3)  # demand-driven now, holding three
    assert doors.commands.reload([model("lm", 1, 2)]) == "lm: 3 -> 2 replicas; stopping lm-2"
    assert (doors.models["lm"].replicas, doors.models["lm"].min_replicas, doors.models["lm"].max_replicas) == (2, 1, 2)
