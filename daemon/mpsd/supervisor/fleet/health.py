"""The probe door into the fleet: readiness, health and what workers report of their memory.

A part of `Fleet` (a mixin it inherits) kept in its own file. Probes run as
background tasks on the event loop; their answers move a STARTING worker to
READY through the fleet's `_transition`, count silence for the hung-worker
kill in `Fleet._tick_ready`, and teach the model's footprint what a worker
really holds.
"""

from __future__ import annotations

import asyncio
import logging

from mpsd.backend_memory import WORKING_SET_KEYS
from mpsd.supervisor.fleet.process import WorkerProcess
from mpsd.supervisor.fleet.records import WorkerRecord
from mpsd.supervisor.fleet.states import PROCESS_STATES, WorkerState
from mpsd.supervisor.memory.footprint import worker_peak_bytes
from mpsd.units import format_bytes
from mpsd.v1 import worker_pb2

log = logging.getLogger("mpsd.fleet")
READY_PROBE_TIMEOUT_S = 1.0
FRESH_STATS_TIMEOUT_S = 1.0
LOSS_EXPLAIN_POLL_S = 0.02


class WorkerHealth:
    """Fleet methods that ask workers how they are, and learn from the answers."""

    def _probe(self, worker: WorkerRecord, now: float) -> None:
        worker.probing, worker.last_probe_at = True, now
        self._background(self._probe_once(worker, worker.process))

    async def _probe_once(self, worker: WorkerRecord, process: WorkerProcess) -> None:
        timeout = READY_PROBE_TIMEOUT_S if worker.state == WorkerState.STARTING else self.config.daemon.health_timeout_s / 2
        try:
            stats = await process.stats(timeout)
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
                stats = await process.stats(FRESH_STATS_TIMEOUT_S)
            except ConnectionError:
                return  # the health probe owns judging silence; status shows the last known counters
            if worker.process is process and worker.state == WorkerState.READY:
                self.record_stats(worker, stats)

        await asyncio.gather(*(ask(w, w.process) for w in self.workers.values() if w.state == WorkerState.READY))

    def record_stats(self, worker: WorkerRecord, stats: worker_pb2.WorkerStats) -> None:
        """Learns the model's footprint from what the worker holds, and OOMs it survived."""
        worker.stats = stats
        working_set = max((stats.backend_memory.get(k, 0) for k in WORKING_SET_KEYS), default=0)
        if working_set:
            self._report_working_set(working_set)
        # What it holds without its batch's KV cache, at most; the full batch's KV is then added once.
        held = worker_peak_bytes(self._footprint_of_pid(worker.pid), dict(stats.backend_memory)) - stats.kv_bytes
        worker.peak_bytes = max(worker.peak_bytes, held)
        footprint = self._footprints[worker.model.name]
        footprint.observe(worker.peak_bytes + stats.kv_reserve_bytes)
        if stats.oom_events > worker.oom_events_seen:
            self._count(worker.model.name).request_ooms += stats.oom_events - worker.oom_events_seen
            worker.oom_events_seen = stats.oom_events
            footprint.raise_after_oom(worker.peak_bytes)
            log.warning("worker %s: out of memory inside a request (%s); %s footprint raised to %s",
                        worker.id, stats.last_oom, worker.model.name, format_bytes(footprint.bytes))

    async def explain_loss(self, worker_id: str, stub, wait_s: float) -> str:
        """How the worker process behind `stub` ended, for the clients whose streams it broke.

        A stream breaks the moment the socket closes; the exit is reaped a
        moment later, so this waits up to wait_s for it. '' when the process
        is still serving (the stream broke for another reason).
        """
        deadline = self._clock() + wait_s
        while True:
            worker = self.workers.get(worker_id)
            if worker is None or worker.process is None:
                return ""
            if worker.process.stub is not stub or worker.state not in PROCESS_STATES:
                return worker.last_exit
            if self._clock() >= deadline:
                return ""
            await asyncio.sleep(LOSS_EXPLAIN_POLL_S)

