"""The fleet's lifecycle without processes: a fake launcher, a fake clock and a file memory probe.

The real thing (WorkerProcess, real workers) is covered by the integration
tests; here each cause is driven by hand and its effect checked in
milliseconds: spawn → READY → exit → BACKOFF → PENDING, the hung kill, drain,
reload diffing, and the snapshot status and metrics render.
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import signal

import pytest
from mpsd.config import parse_config
from mpsd.supervisor.fleet.commands import Change, ControlError, plan_reload
from mpsd.supervisor.fleet.fleet import Fleet
from mpsd.supervisor.fleet.records import KillCause
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.probes import FileMemoryProbe
from mpsd.v1 import worker_pb2
from mpsd.worker_spec import WorkerSpec
from support import write_probe

GiB = 1024**3
PIDS = itertools.count(1000)
DAEMON = """
[daemon]
restart_delay = "1s"
restart_max_delay = "1s"
health_interval = "1s"
health_timeout = "4s"
drain_grace = "2s"
stop_timeout = "1s"
[memory]
probe = "file:memory.json"
"""


class FakeProcess:
    """Stands in for WorkerProcess: the test says when it answers probes and when it exits."""

    def __init__(self, spec: WorkerSpec, env: dict[str, str]) -> None:
        self.spec, self.env = spec, env
        self.worker_id, self.socket_path = spec.worker_id, spec.socket
        self.pid = next(PIDS)
        self.stub = object()
        self.signals: list[signal.Signals] = []
        self.answering = True
        self.stats_reply = worker_pb2.WorkerStats(device="cpu")
        self.exit_on_term = True
        self.stderr_tail: list[str] = []
        self.budgets: list[int | None] = []  # the prefix cache budget each Stats request carried
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def start(self) -> None:
        pass

    async def wait(self) -> int:
        return await self._exited

    async def stats(self, timeout_s: float, prefix_cache_budget: int | None = None) -> worker_pb2.WorkerStats:
        self.budgets.append(prefix_cache_budget)
        if not self.answering:
            raise ConnectionError("no answer")
        return self.stats_reply

    def send_signal(self, signum: signal.Signals) -> None:
        self.signals.append(signum)
        if signum == signal.SIGKILL or (signum == signal.SIGTERM and self.exit_on_term):
            self.exit(-signum)

    def exit(self, returncode: int, *stderr: str) -> None:
        if not self._exited.done():
            self.stderr_tail = list(stderr)
            self._exited.set_result(returncode)

    async def close_channel(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Harness:
    """A fleet on fakes, with every transition recorded as the router would see it."""

    def __init__(self, tmp_path: pathlib.Path, models_toml: str) -> None:
        self.memory_file = tmp_path / "memory.json"
        self.set_memory(budget=16 * GiB, used=2 * GiB)
        self.config = parse_config(DAEMON + models_toml, source="test.toml", base_dir=tmp_path)
        self.clock = Clock()
        self.processes: list[FakeProcess] = []
        self.transitions: list[tuple[str, str, str]] = []
        self.fleet = Fleet(
            self.config, tmp_path, lambda model: {"MODEL": model.name},
            lambda w, old, new: self.transitions.append((w.id, old.value, new.value)),
            FileMemoryProbe(self.memory_file), clock=self.clock, footprint_of_pid=lambda pid: GiB // 2,
            launch=self._launch)

    def _launch(self, spec: WorkerSpec, env: dict[str, str]) -> FakeProcess:
        process = FakeProcess(spec, env)
        self.processes.append(process)
        return process

    def set_memory(self, budget: int, used: int) -> None:
        write_probe(self.memory_file, budget, used)

    async def step(self, seconds: float = 0.0) -> None:
        """Time passes, the tick runs, and the background tasks it started (probes, reaps) get to run."""
        self.clock.now += seconds
        self.fleet.tick()
        for _ in range(5):
            await asyncio.sleep(0)

    async def all_ready(self) -> "Harness":
        """Admission starts one worker at a time: a step to spawn it, a step for its probe to answer."""
        for _ in range(2 * len(self.fleet.workers)):
            await self.step()
        assert all(w.state == WorkerState.READY for w in self.fleet.workers.values())
        return self

    def state(self, worker_id: str) -> WorkerState:
        return self.fleet.workers[worker_id].state


def run(scenario) -> None:
    asyncio.run(scenario())


ONE_MODEL = """
[[models]]
name = "lm"
backend = "null-lm"
replicas = 1
concurrency = 3
footprint = "1GiB"
"""


def test_spawn_ready_exit_backoff_pending_and_spawn_again(tmp_path):
    async def scenario():
        h = Harness(tmp_path, ONE_MODEL)
        await h.step()
        assert h.state("lm-0") == WorkerState.STARTING
        spec = h.processes[0].spec
        assert (spec.worker_id, spec.backend, spec.concurrency) == ("lm-0", "null-lm", 3)
        assert pathlib.Path(spec.socket).parent == tmp_path and h.processes[0].env == {"MODEL": "lm"}
        await h.step()
        assert h.state("lm-0") == WorkerState.READY
        assert "loaded and warmed" in h.fleet.workers["lm-0"].reason

        h.processes[0].exit(1)
        await h.step()
        worker = h.fleet.workers["lm-0"]
        assert worker.state == WorkerState.BACKOFF and "crashed: exit code 1" in worker.reason
        assert worker.last_exit.startswith("crash:")
        await h.step(0.5)
        assert h.state("lm-0") == WorkerState.BACKOFF, "the delay has not passed"
        await h.step(0.8)
        assert len(h.processes) == 2 and h.state("lm-0") == WorkerState.STARTING
        assert h.transitions == [
            ("lm-0", "PENDING", "STARTING"), ("lm-0", "STARTING", "READY"), ("lm-0", "READY", "BACKOFF"),
            ("lm-0", "BACKOFF", "PENDING"), ("lm-0", "PENDING", "STARTING")]
        snapshot = h.fleet.snapshot()
        assert snapshot.workers[0].restarts == 1 and snapshot.models[0].counts.restarts == 1
        assert snapshot.workers[0].pid == h.processes[1].pid

    run(scenario)


def test_a_worker_silent_while_loading_is_killed_as_hung_and_its_exit_says_so(tmp_path):
    async def scenario():
        h = Harness(tmp_path, ONE_MODEL.replace('footprint', 'load_timeout = "10s"\nfootprint'))
        await h.step()
        h.processes[0].answering = False
        await h.step(5)
        assert h.processes[0].signals == [] and h.state("lm-0") == WorkerState.STARTING
        await h.step(6)
        worker = h.fleet.workers["lm-0"]
        assert h.processes[0].signals == [signal.SIGKILL]
        assert worker.state == WorkerState.BACKOFF
        assert worker.last_exit == "killed: not ready within load_timeout 10s: killed as hung"
        await h.step(1.5)
        assert h.fleet.workers["lm-0"].kill_cause is None, "a fresh process starts with no kill recorded"

    run(scenario)


def test_a_ready_worker_silent_to_probes_is_killed_but_one_slow_answer_is_not(tmp_path):
    async def scenario():
        h = await Harness(tmp_path, ONE_MODEL).all_ready()
        h.processes[0].answering = False
        await h.step(1)  # one failed probe, silent for 1 s
        await h.step(1)  # two failed probes, silent for 2 s: not yet health_timeout
        assert h.processes[0].signals == []
        await h.step(1)
        await h.step(1)
        assert h.processes[0].signals == [signal.SIGKILL]
        assert h.fleet.workers["lm-0"].kill_cause == KillCause.HEALTH_TIMEOUT
        assert "no answer to health probes for 4.0s: killed as hung" in h.fleet.workers["lm-0"].last_exit

    run(scenario)


def test_a_sigkill_from_outside_is_not_called_hung(tmp_path):
    async def scenario():
        h = await Harness(tmp_path, ONE_MODEL).all_ready()
        h.processes[0].exit(-signal.SIGKILL)
        await h.step()
        assert "SIGKILL from outside" in h.fleet.workers["lm-0"].last_exit

    run(scenario)


def test_drain_stops_a_worker_for_good_and_escalates_to_kill_after_the_grace(tmp_path):
    async def scenario():
        h = await Harness(tmp_path, ONE_MODEL.replace("replicas = 1", "replicas = 2")).all_ready()
        assert h.fleet.commands.drain_worker("lm-0").startswith("lm-0: draining")
        assert h.processes[0].signals == [signal.SIGTERM]
        await h.step()
        assert h.state("lm-0") == WorkerState.STOPPED and h.fleet.workers["lm-0"].reason.startswith("stopped (")
        await h.step(60)
        assert h.state("lm-0") == WorkerState.STOPPED and len(h.processes) == 2, "a drained worker stays stopped"
        with pytest.raises(ControlError, match="already STOPPED"):
            h.fleet.commands.drain_worker("lm-0")

        stubborn = h.processes[1]
        stubborn.exit_on_term = False
        h.fleet.commands.drain_worker("lm-1")
        await h.step(2.5)
        assert stubborn.signals == [signal.SIGTERM] and h.state("lm-1") == WorkerState.DRAINING
        await h.step(1)  # drain_grace 2 s + stop_timeout 1 s are over
        assert stubborn.signals == [signal.SIGTERM, signal.SIGKILL] and h.state("lm-1") == WorkerState.STOPPED

    run(scenario)


def test_admission_refuses_what_does_not_fit_and_the_refusal_follows_the_numbers(tmp_path):
    async def scenario():
        h = Harness(tmp_path, ONE_MODEL.replace('footprint = "1GiB"', 'footprint = "10GiB"'))
        h.set_memory(budget=16 * GiB, used=8 * GiB)
        await h.step()
        assert h.state("lm-0") == WorkerState.REFUSED and not h.processes
        first = h.fleet.workers["lm-0"].reason
        h.set_memory(budget=16 * GiB, used=7 * GiB)
        await h.step()
        assert h.state("lm-0") == WorkerState.REFUSED and h.fleet.workers["lm-0"].reason != first
        assert h.transitions == [("lm-0", "PENDING", "REFUSED")], "a changed reason is not a transition"
        h.set_memory(budget=16 * GiB, used=5 * GiB)
        await h.step()
        assert h.state("lm-0") == WorkerState.STARTING

    run(scenario)


def test_the_snapshot_computes_free_memory_once_and_reports_a_failed_probe(tmp_path):
    async def scenario():
        h = await Harness(tmp_path, ONE_MODEL.replace("replicas = 1", "replicas = 2")).all_ready()
        h.set_memory(budget=16 * GiB, used=5 * GiB)
        snapshot = h.fleet.snapshot()
        # 16 budget - 3 used by others - 2 x 1 GiB live footprints (the probe's "used" counts them once)
        assert snapshot.memory.free_for_workers_bytes == 11 * GiB
        assert [(w.state, w.memory_bytes) for w in snapshot.workers] == [(WorkerState.READY, GiB // 2)] * 2
        assert (snapshot.models[0].footprint_bytes, snapshot.models[0].footprint_source) == (GiB, "configured")
        h.memory_file.write_text("{")
        failed = h.fleet.snapshot().memory
        assert failed.snapshot is None and "not valid JSON" in failed.error and failed.free_for_workers_bytes == 0

    run(scenario)


def test_plan_reload_removes_first_then_adds_replaces_and_rescales_in_config_order(tmp_path):
    old = parse_config(ONE_MODEL + ONE_MODEL.replace('"lm"', '"gone"') + ONE_MODEL.replace('"lm"', '"same"'),
                       source="t", base_dir=tmp_path)
    new = parse_config(ONE_MODEL.replace("replicas = 1", "replicas = 3") + ONE_MODEL.replace('"lm"', '"new"')
                       + ONE_MODEL.replace('"lm"', '"same"').replace("concurrency = 3", "concurrency = 4"),
                       source="t", base_dir=tmp_path)
    plan = plan_reload({m.name: m for m in old.models}, new.models)
    assert [(step.change, step.name) for step in plan] == [
        (Change.REMOVED, "gone"), (Change.RESCALED, "lm"), (Change.ADDED, "new"), (Change.REPLACED, "same")]
    assert plan_reload({m.name: m for m in old.models}, old.models) == []


def test_apply_config_keeps_unchanged_workers_and_replaces_changed_ones(tmp_path):
    async def scenario():
        h = await Harness(tmp_path, ONE_MODEL + ONE_MODEL.replace('"lm"', '"other"')).all_ready()
        first = h.fleet.workers["lm-0"].process
        new = parse_config(DAEMON + ONE_MODEL.replace("replicas = 1", "replicas = 2")
                           + ONE_MODEL.replace('"lm"', '"other"').replace("concurrency = 3", "concurrency = 1"),
                           source="test.toml", base_dir=tmp_path)
        message = h.fleet.apply_config(new)
        assert message == "lm: 1 -> 2 replicas; added lm-1; replaced other"
        assert h.fleet.workers["lm-0"].process is first and h.state("lm-0") == WorkerState.READY
        await h.step()
        assert h.state("lm-1") == WorkerState.STARTING
        assert "other-0" not in h.fleet.workers, "the replaced worker is removed once it has stopped"
        assert h.fleet.workers["other-1"].model.concurrency == 1
        assert list(h.fleet.models) == ["lm", "other"]
        assert h.fleet.apply_config(new) == "no model changed"

    run(scenario)



def test_the_learned_footprint_leaves_room_for_the_kv_cache_a_full_batch_would_hold(tmp_path):
    async def scenario():
        h = await Harness(tmp_path, ONE_MODEL.replace('footprint = "1GiB"\n', "")).all_ready()
        assert h.fleet.snapshot().models[0].footprint_source == "learned"  # the process's half GiB
        h.processes[0].stats_reply = worker_pb2.WorkerStats(device="cpu", kv_bytes=GiB // 4, kv_reserve_bytes=GiB)
        await h.step(1)  # the next health probe brings the figures; of the process's half GiB, a quarter is KV
        model = h.fleet.snapshot().models[0]
        assert (model.footprint_bytes, model.footprint_source) == (GiB // 2 + GiB, "learned")
        h.processes[0].stats_reply = worker_pb2.WorkerStats(device="cpu", kv_bytes=0, kv_reserve_bytes=GiB)
        await h.step(1)  # the batch emptied: the KV it held is not counted twice
        assert h.fleet.snapshot().models[0].footprint_bytes == GiB // 2 + GiB

    run(scenario)


TWO_GPUS = """
[[models]]
name = "lm"
backend = "null-lm"
device = "cuda"
replicas = 2
footprint = "6GiB"
"""


def write_gpus(path: pathlib.Path, *budgets: int) -> None:
    import json

    path.write_text(json.dumps({"devices": [{"device": f"cuda:{i}", "budget_bytes": b, "used_bytes": 0}
                                            for i, b in enumerate(budgets)]}))


def test_replicas_start_on_different_gpus_in_one_pass_and_an_oom_moves_to_a_gpu_that_holds_it(tmp_path):
    async def scenario():
        h = Harness(tmp_path, TWO_GPUS)
        write_gpus(h.memory_file, 10 * GiB, 10 * GiB)
        await h.step()
        assert [h.state("lm-0"), h.state("lm-1")] == [WorkerState.STARTING] * 2, "per device: no wait for each other"
        assert [(p.spec.placed_device, p.env["CUDA_VISIBLE_DEVICES"]) for p in h.processes] == [("cuda:0", "0"),
                                                                                                  ("cuda:1", "1")]
        await h.step()
        h.processes[1].exit(1, "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
        await h.step()
        assert h.state("lm-1") == WorkerState.OOM
        await h.step(5)
        assert h.state("lm-1") == WorkerState.OOM, "nothing changed: no retry into the same wall"
        write_gpus(h.memory_file, 20 * GiB, 10 * GiB)
        await h.step()
        worker = h.fleet.workers["lm-1"]
        assert worker.state == WorkerState.STARTING and worker.device == "cuda:0"
        assert h.processes[-1].env["CUDA_VISIBLE_DEVICES"] == "0"
        assert ("lm-1", "OOM", "PENDING") in h.transitions
        memory = h.fleet.snapshot().memory
        assert [(d.snapshot.device, d.workers) for d in memory.devices] == [("cuda:0", ("lm-0", "lm-1")),
                                                                             ("cuda:1", ())]
        assert memory.free_for_workers_bytes == 10 * GiB and memory.snapshot.budget_bytes == 30 * GiB

    run(scenario)
