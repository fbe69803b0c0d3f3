"""DemandBalancer alone: no Fleet, no memory probe; the router's load, the room and the fleet's doors are fakes.

The decision itself is memory/demand.py's (tested in test_demand_policy.py);
here it is what the balancer feeds it from the workers and how it applies the
answer: a start adds a worker and counts it, a stop drains one for removal and
counts why, a block is kept for admission's refusal to quote.
"""

from __future__ import annotations

from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.balancer import DemandBalancer
from mpsd.supervisor.fleet.records import AfterStop, ModelCounts, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.footprint import Footprint

GiB = 1024**3


class Load:
    """What the router would report of one model's traffic."""

    def __init__(self, queued: int = 0, busy: dict[str, int] | None = None, idle: dict[str, float] | None = None):
        self.queued, self._busy, self._idle = queued, busy or {}, idle or {}

    def inflight(self, worker_id: str) -> int:
        return self._busy.get(worker_id, 0)

    def idle_since(self, worker_id: str) -> float | None:
        return self._idle.get(worker_id)


class Doors:
    """The fleet as demand sees it, recording every start and stop it is asked for."""

    def __init__(self, *models: ModelConfig, free_bytes: int = 0) -> None:
        self.models = {m.name: m for m in models}
        self.workers: dict[str, WorkerRecord] = {}
        self.loads: dict[str, Load] = {}
        self.counts: dict[str, ModelCounts] = {}
        self.stops: list[tuple[str, str, AfterStop]] = []
        self.free, self.memory_reads, self.stopping = free_bytes, 0, False
        self.rooms_asked: list[str] = []
        footprints = {m.name: Footprint(estimated_bytes=GiB, configured_bytes=m.footprint_bytes) for m in models}
        self.demand = DemandBalancer(
            self.models, self.workers, load_of=self.loads.get, footprints=footprints,
            count=lambda name: self.counts.setdefault(name, ModelCounts()), add_worker=self.add_worker,
            stop_worker=self._stop_worker, room=self._room, stopping=lambda: self.stopping)

    def add_worker(self, m: ModelConfig, reason: str = "configured", state: WorkerState = WorkerState.PENDING,
                   ready_at: float = 0.0) -> WorkerRecord:
        worker = WorkerRecord(id=f"{m.name}-{len(self.workers)}", model=m, state=state, reason=reason,
                              ready_at=ready_at)
        self.workers[worker.id] = worker
        return worker

    def _stop_worker(self, worker: WorkerRecord, reason: str, after: AfterStop) -> None:
        self.stops.append((worker.id, reason, after))
        worker.state, worker.after_stop = WorkerState.DRAINING, after

    def _room(self, device: str) -> tuple[int, int]:
        self.memory_reads += 1
        self.rooms_asked.append(device)
        return self.free, 0


def model(name: str, low: int = 0, high: int = 2, **fields) -> ModelConfig:
    return ModelConfig(name=name, backend="null-lm", min_replicas=low, max_replicas=high, footprint_bytes=4 * GiB,
                       **fields)


def test_prospects_say_none_is_coming_only_when_no_worker_can_still_serve():
    doors = Doors(model("lm", high=1), model("static", low=1, high=1))
    assert doors.demand.prospects("lm") is None, "no worker yet, but demand may start one"
    doors.add_worker(doors.models["static"], state=WorkerState.STOPPED)
    assert doors.demand.prospects("static") == "none is coming", "drained, and at its max"
    assert doors.demand.prospects("removed") == "none is coming"
    doors.stopping = True
    assert doors.demand.prospects("lm") == "none is coming", "the daemon is stopping: demand starts nothing"
    doors.stopping = False
    doors.add_worker(doors.models["lm"], "3 failures within 60s; giving up", WorkerState.FATAL)
    assert doors.demand.prospects("lm") == "lm-1 gave up: 3 failures within 60s; giving up"
    doors.add_worker(doors.models["lm"], state=WorkerState.BACKOFF)
    assert doors.demand.prospects("lm") is None, "one is on its way back"


def test_why_waiting_quotes_the_refusal_of_the_models_next_worker():
    doors = Doors(model("lm"))
    doors.add_worker(doors.models["lm"], state=WorkerState.READY)
    assert doors.demand.why_waiting("lm") == ""
    doors.add_worker(doors.models["lm"], "needs 4.0GiB, 1.0GiB free", WorkerState.REFUSED)
    assert doors.demand.why_waiting("lm") == "needs 4.0GiB, 1.0GiB free"


def test_a_start_adds_a_worker_and_counts_it_and_the_next_waits_for_it_and_the_cooldown():
    doors = Doors(model("lm"))
    doors.loads["lm"] = Load(queued=2)
    doors.demand.balance(100.0, min_residency_s=30)
    worker = doors.workers["lm-0"]
    assert (worker.state, worker.reason) == (WorkerState.PENDING, "started on demand: 2 queued; waiting for admission")
    assert doors.counts["lm"].demand_starts == 1
    assert doors.demand.last_changes == {"lm": "lm-0 started on demand: 2 queued"}
    assert doors.memory_reads == 0, "nothing waits for memory: the probe is not read"
    doors.demand.balance(101.0, min_residency_s=30)
    assert len(doors.workers) == 1, "one start at a time while it is on its way"
    worker.state, worker.ready_at = WorkerState.READY, 102.0
    doors.demand.balance(103.0, min_residency_s=30)
    assert len(doors.workers) == 1, "the cooldown since the last start paces scaling up"
    doors.demand.balance(105.0, min_residency_s=30)
    assert len(doors.workers) == 2 and doors.counts["lm"].demand_starts == 2


def test_an_idle_worker_past_keep_alive_is_stopped_for_removal_and_counted_as_an_idle_stop():
    doors = Doors(model("lm", keep_alive_s=60.0))
    doors.add_worker(doors.models["lm"], state=WorkerState.READY, ready_at=5.0)
    doors.loads["lm"] = Load(idle={"lm-0": 10.0})
    doors.demand.balance(69.0, min_residency_s=30)
    assert doors.stops == []
    doors.demand.balance(100.0, min_residency_s=30)
    assert doors.stops == [("lm-0", "stopped: idle 1m30s", AfterStop.REMOVE)]
    assert (doors.counts["lm"].idle_stops, doors.counts["lm"].evictions) == (1, 0)
    assert doors.workers["lm-0"].evicted_for == ""


def test_a_stop_for_room_drains_the_evicted_worker_counts_an_eviction_and_is_not_repeated_while_it_drains():
    doors = Doors(model("a", keep_alive_s=None), model("b"), free_bytes=GiB)
    doors.add_worker(doors.models["a"], state=WorkerState.READY)
    doors.add_worker(doors.models["b"], "needs room", WorkerState.REFUSED)
    doors.loads["b"] = Load(queued=1)
    doors.demand.balance(100.0, min_residency_s=30)
    assert doors.stops == [("a-0", "evicted for model b (needs 4.0GiB, 1.0GiB free)", AfterStop.REMOVE)]
    assert doors.workers["a-0"].evicted_for == "b" and doors.counts["a"].evictions == 1
    assert doors.memory_reads == 1 and doors.demand.blocked("b") == ""
    assert doors.demand.last_changes["a"].startswith("a-0 evicted for model b")
    doors.demand.balance(101.0, min_residency_s=30)
    assert len(doors.stops) == 1, "no second eviction while the first one drains"


def test_a_model_that_cannot_get_room_is_recorded_as_blocked_until_the_next_balance():
    doors = Doors(model("a", keep_alive_s=None), model("b"), free_bytes=GiB)
    doors.add_worker(doors.models["a"], state=WorkerState.READY)
    refused = doors.add_worker(doors.models["b"], "needs room", WorkerState.REFUSED)
    doors.loads.update(a=Load(busy={"a-0": 1}), b=Load(queued=1))
    doors.demand.balance(100.0, min_residency_s=30)
    assert doors.demand.blocked("b") == "nothing evictable (a-0 busy)" and doors.stops == []
    refused.state = WorkerState.STARTING
    doors.demand.balance(101.0, min_residency_s=30)
    assert doors.demand.blocked("b") == "", "each balance says afresh what blocks a model"
