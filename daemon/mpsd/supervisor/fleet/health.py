"""Is each worker alive, and what does it really hold? Readiness, the hung-worker kill and learned footprints.

A part the fleet composes, not a base it inherits: it is handed the fleet's
workers to read, the fleet's one door (`transition`) and a way to run a probe
in the background, and nothing else of the fleet, so it is tested alone with a
fake process and a fake clock. Probes run on the event loop; an answer moves a
STARTING worker to READY, silence counts towards killing it as hung, and the
figures teach the model's footprint what a worker holds. A hung worker is only
signalled here: its exit, reaped by the fleet, is what changes its state.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine, Mapping

from mpsd.backend_memory import WORKING_SET_KEYS
from mpsd.supervisor.fleet.cache_budgets import requested_budget
from mpsd.supervisor.fleet.process import WorkerProcess
from mpsd.supervisor.fleet.records import KillCause, ModelCounts, Transition, WorkerRecord
from mpsd.supervisor.fleet.states import PROCESS_STATES, WorkerState
from mpsd.supervisor.memory.footprint import Footprint, worker_peak_bytes
from mpsd.units import format_bytes
from mpsd.v1 import worker_pb2

log = logging.getLogger("mpsd.fleet")
READY_PROBE_TIMEOUT_S = 1.0
FRESH_STATS_TIMEOUT_S = 1.0
LOSS_EXPLAIN_POLL_S = 0.02
# A READY worker is killed as hung once it has been silent for health_timeout
# and at least this many probes (each given half of health_timeout) failed:
# one slow answer under load is not a hang, two in a row that long is.
HEALTH_FAILURES_BEFORE_KILL = 2


class WorkerHealth:
    """Asks workers how they are, on the tick's deadlines and on status's demand, and learns from the answers."""

    def __init__(self, workers: Mapping[str, WorkerRecord], *, transition: Transition,
                 background: Callable[[Coroutine], None], footprints: Mapping[str, Footprint],
                 count: Callable[[str], ModelCounts], interval_s: float, timeout_s: float, clock: Callable[[], float],
                 footprint_of_pid: Callable[[int], int], report_working_set: Callable[[int], None]) -> None:
        self._workers = workers
        self._transition = transition
        self._background = background
        self._footprints = footprints
        self._count = count
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._footprint_of_pid = footprint_of_pid
        self._report_working_set = report_working_set

    def watch_starting(self, worker: WorkerRecord, now: float) -> None:
        """The tick's look at a loading worker: probed until it answers, killed past its model's load_timeout."""
        if now - worker.started_at > worker.model.load_timeout_s:
            self._kill_hung(worker, KillCause.LOAD_TIMEOUT, f"not ready within load_timeout {worker.model.load_timeout_s:g}s")
        elif not worker.probing:
            self._probe(worker, now)

    def watch_ready(self, worker: WorkerRecord, now: float) -> None:
        """The tick's look at a serving worker: probed every interval, killed once silent past the timeout."""
        if not worker.probing and now - worker.last_probe_at >= self._interval_s:
            self._probe(worker, now)
        silent_for = now - worker.last_probe_ok_at
        if worker.probe_failures >= HEALTH_FAILURES_BEFORE_KILL and silent_for >= self._timeout_s:
            self._kill_hung(worker, KillCause.HEALTH_TIMEOUT, f"no answer to health probes for {silent_for:.1f}s")
            worker.probe_failures = 0

    def _kill_hung(self, worker: WorkerRecord, cause: KillCause, detail: str) -> None:
        """Recorded as data, so the exit that follows is told apart from a SIGKILL from outside."""
        worker.kill_cause, worker.kill_detail = cause, detail
        log.warning("worker %s %s: killed as hung", worker.id, detail)
        worker.process.send_signal(signal.SIGKILL)

    def _probe(self, worker: WorkerRecord, now: float) -> None:
        worker.probing, worker.last_probe_at = True, now
        self._background(self._probe_once(worker, worker.process))

    async def _probe_once(self, worker: WorkerRecord, process: WorkerProcess) -> None:
        timeout = READY_PROBE_TIMEOUT_S if worker.state == WorkerState.STARTING else self._timeout_s / 2
        try:
            stats = await process.stats(timeout, requested_budget(worker))
        except ConnectionError:
            if worker.process is process and worker.state == WorkerState.READY:
                worker.probe_failures += 1
            return
        finally:
            worker.probing = False
        if worker.process is not process or worker.state not in (WorkerState.STARTING, WorkerState.READY):
            return
        worker.probe_failures, worker.last_probe_ok_at = 0, self._clock()
        self.record_stats(worker, stats)
        if worker.state == WorkerState.STARTING:
            elapsed = self._clock() - worker.started_at
            worker.ready_at = self._clock()
            self._transition(worker, WorkerState.READY, f"model loaded and warmed in {elapsed:.1f}s on {stats.device}")

    async def refresh_stats(self) -> None:
        """Asks READY workers for their counters now, so status is not a probe period old."""
        async def ask(worker: WorkerRecord, process: WorkerProcess) -> None:
            try:
                stats = await process.stats(FRESH_STATS_TIMEOUT_S, requested_budget(worker))
            except ConnectionError:
                return  # the health probe owns judging silence; status shows the last known counters
            if worker.process is process and worker.state == WorkerState.READY:
                self.record_stats(worker, stats)

        await asyncio.gather(*(ask(w, w.process) for w in self._workers.values() if w.state == WorkerState.READY))

    def send_budget(self, worker: WorkerRecord) -> None:
        """Tells a READY worker its prefix cache budget now, not at the next probe (which carries it again anyway)."""
        async def send(process: WorkerProcess) -> None:
            try:
                stats = await process.stats(self._timeout_s / 2, requested_budget(worker))
            except ConnectionError:
                return  # the next health probe carries the budget; judging silence is the probe's
            if worker.process is process and worker.state == WorkerState.READY:
                self.record_stats(worker, stats)

        self._background(send(worker.process))

    def record_stats(self, worker: WorkerRecord, stats: worker_pb2.WorkerStats) -> None:
        """Learns the model's footprint from what the worker holds, and OOMs it survived.

        What it holds without its batch's KV and its prefix cache, plus a full
        batch's KV reserve and the cache's configured budget (not what it holds,
        nor a budget the daemon shrank it to): a new worker of the model is
        admitted with room for its full cache.
        """
        worker.stats = stats
        working_set = max((stats.backend_memory.get(k, 0) for k in WORKING_SET_KEYS), default=0)
        if working_set:
            self._report_working_set(working_set)
        # What it holds without its batch's KV and its prefix cache, at most; each is then added once, in full.
        cache = stats.prefix_cache
        held = (worker_peak_bytes(self._footprint_of_pid(worker.pid), dict(stats.backend_memory)) - stats.kv_bytes
                - cache.bytes)
        worker.peak_bytes = max(worker.peak_bytes, held)
        footprint = self._footprints[worker.model.name]
        footprint.observe(worker.peak_bytes + stats.kv_reserve_bytes + cache.configured_bytes, cache.configured_bytes)
        if stats.oom_events > worker.oom_events_seen:
            self._count(worker.model.name).request_ooms += stats.oom_events - worker.oom_events_seen
            worker.oom_events_seen = stats.oom_events
            footprint.raise_after_oom(worker.peak_bytes)
            log.warning("worker %s: out of memory inside a request (%s); %s footprint raised to %s",
                        worker.id, stats.last_oom, worker.model.name, format_bytes(footprint.bytes))

    async def explain_loss(self, worker_id: str, link, wait_s: float) -> str:
        """How the worker process behind `link` ended, for the clients whose streams it broke.

        A stream breaks the moment the socket closes; the exit is reaped a
        moment later, so this waits up to wait_s for it. '' when the process
        is still serving (the stream broke for another reason).
        """
        deadline = self._clock() + wait_s
        while True:
            worker = self._workers.get(worker_id)
            if worker is None or worker.process is None:
                return ""
            if worker.process.link is not link or worker.state not in PROCESS_STATES:
                return worker.last_exit
            if self._clock() >= deadline:
                return ""
            await asyncio.sleep(LOSS_EXPLAIN_POLL_S)
