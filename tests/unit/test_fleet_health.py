"""WorkerHealth alone: no Fleet, no admission, no other part; a fake process, a fake clock and a recording door.

The door (`transition`) moves the state as the fleet's would, so what health
asks of the fleet is exactly what is checked here: readiness through it, the
hung kill as a signal and a recorded cause, never a state of its own.
"""

from __future__ import annotations

import asyncio
import functools
import signal

from mpsd.backend_memory import MPS_RECOMMENDED_MAX
from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.health import WorkerHealth
from mpsd.supervisor.fleet.records import KillCause, ModelCounts, WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.footprint import Footprint
from mpsd.v1 import worker_pb2

GiB = 1024**3
MODEL = ModelConfig(name="lm", backend="null-lm", load_timeout_s=10.0)


def on_a_loop(test):
    """Runs an async test on a fresh event loop: probes, refresh_stats and explain_loss are coroutines."""
    return functools.wraps(test)(lambda: asyncio.run(test()))


class Process:
    """Answers stats() with `reply`, or raises ConnectionError when `reply` is None."""

    def __init__(self, pid: int = 4242) -> None:
        self.pid, self.link = pid, object()
        self.reply: worker_pb2.WorkerStats | None = worker_pb2.WorkerStats(device="cpu")
        self.signals: list[signal.Signals] = []
        self.budgets: list[int | None] = []  # the prefix cache budget each Stats request carried

    async def stats(self, timeout_s: float, prefix_cache_budget: int | None = None) -> worker_pb2.WorkerStats:
        self.budgets.append(prefix_cache_budget)
        if self.reply is None:
            raise ConnectionError("no answer")
        return self.reply

    def send_signal(self, signum: signal.Signals) -> None:
        self.signals.append(signum)


class Part:
    """WorkerHealth with every fleet door replaced by a recording stand-in."""

    def __init__(self, footprint: Footprint | None = None) -> None:
        self.now = 100.0
        self.workers: dict[str, WorkerRecord] = {}
        self.moves: list[tuple[str, WorkerState, str]] = []
        self.pending: list = []
        self.counts: dict[str, ModelCounts] = {}
        self.working_sets: list[int] = []
        self.footprints = {"lm": footprint or Footprint(estimated_bytes=GiB)}
        self.health = WorkerHealth(
            self.workers, transition=self._transition, background=self.pending.append, footprints=self.footprints,
            count=lambda name: self.counts.setdefault(name, ModelCounts()), interval_s=1.0, timeout_s=4.0,
            clock=lambda: self.now, footprint_of_pid=lambda pid: GiB // 2, report_working_set=self.working_sets.append)

    def _transition(self, worker: WorkerRecord, new: WorkerState, reason: str) -> None:
        self.moves.append((worker.id, new, reason))
        worker.state, worker.reason = new, reason

    def worker(self, state: WorkerState, silent: bool = False) -> WorkerRecord:
        worker = WorkerRecord(id=f"lm-{len(self.workers)}", model=MODEL, state=state, process=Process(),
                              started_at=self.now, last_probe_ok_at=self.now)
        if silent:
            worker.process.reply = None
        self.workers[worker.id] = worker
        return worker

    async def run_probes(self) -> None:
        while self.pending:
            await self.pending.pop(0)

    async def tick(self, worker: WorkerRecord, seconds: float) -> None:
        """The fleet's tick `seconds` after the start, for this worker, and the probe it sent, answered or not."""
        watch = self.health.watch_starting if worker.state == WorkerState.STARTING else self.health.watch_ready
        watch(worker, self.now + seconds)
        await self.run_probes()


@on_a_loop
async def test_a_probe_answer_moves_a_starting_worker_to_ready_through_the_door():
    part = Part()
    worker = part.worker(WorkerState.STARTING)
    part.now += 2.5
    part.health.watch_starting(worker, part.now)
    assert worker.probing and len(part.pending) == 1 and part.moves == [], "the answer comes in the background"
    part.health.watch_starting(worker, part.now)
    assert len(part.pending) == 1, "one probe at a time"
    await part.run_probes()
    assert part.moves == [("lm-0", WorkerState.READY, "model loaded and warmed in 2.5s on cpu")]
    assert not worker.probing and worker.ready_at == part.now and worker.stats is not None


@on_a_loop
async def test_a_silent_loading_worker_is_killed_past_its_load_timeout_and_the_cause_is_recorded():
    part = Part()
    worker = part.worker(WorkerState.STARTING, silent=True)
    await part.tick(worker, 5)
    assert worker.probe_failures == 0, "silence while loading is what load_timeout judges, not the count"
    await part.tick(worker, 10.5)
    assert worker.process.signals == [signal.SIGKILL] and part.moves == []
    assert (worker.kill_cause, worker.kill_detail) == (KillCause.LOAD_TIMEOUT, "not ready within load_timeout 10s")


@on_a_loop
async def test_silence_counts_failures_and_a_ready_worker_is_killed_only_after_two_and_the_timeout():
    part = Part()
    worker = part.worker(WorkerState.READY, silent=True)
    await part.tick(worker, 1)
    await part.tick(worker, 2)
    assert worker.probe_failures == 2 and worker.process.signals == [], "two failures, but silent only 2 s of 4"
    part.health.watch_ready(worker, part.now + 2.5)
    assert part.pending == [] and worker.process.signals == [], "not yet a probe interval since the last one"
    part.health.watch_ready(worker, part.now + 4)
    assert worker.process.signals == [signal.SIGKILL] and worker.kill_cause == KillCause.HEALTH_TIMEOUT
    assert worker.kill_detail == "no answer to health probes for 4.0s" and worker.probe_failures == 0
    await part.run_probes()
    assert part.moves == [], "the exit the kill causes is what changes the state, in the fleet"


@on_a_loop
async def test_one_answer_clears_the_failures_and_restarts_the_silence():
    part = Part()
    worker = part.worker(WorkerState.READY, silent=True)
    await part.tick(worker, 1)
    assert worker.probe_failures == 1
    worker.process.reply = worker_pb2.WorkerStats(device="cpu")
    part.now += 2
    await part.tick(worker, 0)
    assert (worker.probe_failures, worker.last_probe_ok_at) == (0, part.now)
    assert part.moves == [], "a READY worker that answers stays where it is"


@on_a_loop
async def test_an_answer_from_a_process_since_replaced_is_ignored():
    part = Part()
    worker = part.worker(WorkerState.STARTING)
    part.health.watch_starting(worker, part.now)
    worker.process = Process(pid=7)  # restarted before the old probe answered
    await part.run_probes()
    assert part.moves == [] and worker.stats is None


def test_record_stats_learns_the_footprint_without_the_batch_kv_and_counts_request_ooms_once():
    part = Part()
    worker = part.worker(WorkerState.READY)
    footprint = part.footprints["lm"]
    part.health.record_stats(worker, worker_pb2.WorkerStats(kv_bytes=GiB // 4, kv_reserve_bytes=GiB))
    assert (footprint.bytes, footprint.source) == (GiB // 4 + GiB, "learned")  # half a GiB held, a quarter of it KV
    assert part.counts == {} and part.working_sets == []

    stats = worker_pb2.WorkerStats(oom_events=2, last_oom="kv", backend_memory={MPS_RECOMMENDED_MAX: 12 * GiB})
    part.health.record_stats(worker, stats)
    assert part.counts["lm"].request_ooms == 2 and part.working_sets == [12 * GiB]
    raised = footprint.bytes
    assert raised > GiB // 4 + GiB, "an OOM inside a request proves the model needs more"
    part.health.record_stats(worker, stats)
    assert part.counts["lm"].request_ooms == 2 and footprint.bytes == raised, "the same OOMs are not counted twice"
    part.health.record_stats(worker, worker_pb2.WorkerStats(oom_events=3))
    assert part.counts["lm"].request_ooms == 3


def test_a_configured_footprint_is_kept_whatever_the_worker_reports():
    part = Part(Footprint(estimated_bytes=GiB, configured_bytes=3 * GiB))
    part.health.record_stats(part.worker(WorkerState.READY), worker_pb2.WorkerStats(kv_reserve_bytes=8 * GiB))
    assert (part.footprints["lm"].bytes, part.footprints["lm"].source) == (3 * GiB, "configured")


@on_a_loop
async def test_refresh_stats_asks_only_ready_workers_and_keeps_the_last_figures_of_a_silent_one():
    part = Part()
    ready, silent, starting = (part.worker(s) for s in (WorkerState.READY, WorkerState.READY, WorkerState.STARTING))
    ready.process.reply = worker_pb2.WorkerStats(device="fresh")
    silent.stats, silent.process.reply = worker_pb2.WorkerStats(device="old"), None
    await part.health.refresh_stats()
    assert ready.stats.device == "fresh" and silent.stats.device == "old" and starting.stats is None
    assert silent.probe_failures == 0, "judging silence is the health probe's, not status's"


@on_a_loop
async def test_explain_loss_says_how_the_process_behind_a_broken_stream_ended():
    part = Part()
    worker = part.worker(WorkerState.READY)
    link = worker.process.link
    assert await part.health.explain_loss("lm-0", link, 0) == "", "still serving: the stream broke otherwise"
    assert await part.health.explain_loss("nobody", link, 1) == ""

    waiting = asyncio.create_task(part.health.explain_loss("lm-0", link, 5))
    await asyncio.sleep(0.05)
    assert not waiting.done(), "the exit is reaped a moment after the socket closes: it waits for it"
    worker.state, worker.last_exit = WorkerState.BACKOFF, "crash: exit code 1"
    assert await asyncio.wait_for(waiting, 1) == "crash: exit code 1"

    worker.state, worker.process = WorkerState.READY, Process(pid=9)
    assert await part.health.explain_loss("lm-0", link, 5) == "crash: exit code 1", "a new process: the old ended"
