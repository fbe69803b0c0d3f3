"""The fleet: every worker's lifecycle, owned in one place.

Only this module assigns a worker's state, through `_transition`, which
checks the move is legal, records why and when, logs one line and tells the
listener (the router). Causes arrive by two doors: a process exited
(`_on_exit`) and the periodic `tick` for deadlines (load timeout, backoff
expiry, health, stop grace).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import pathlib
import signal
import time
from typing import Callable

import grpc

from mpsd.config import Config, ModelConfig
from mpsd.supervisor.backoff import RestartPolicy, restart_delay, should_give_up
from mpsd.supervisor.exits import ExitKind, classify_exit
from mpsd.supervisor.states import PROCESS_STATES, WorkerState, check_transition
from mpsd.supervisor.worker_process import WorkerProcess
from mpsd.v1 import worker_pb2

log = logging.getLogger("mpsd.fleet")
TICK_S = 0.1
READY_PROBE_TIMEOUT_S = 1.0
HEALTH_FAILURES_BEFORE_KILL = 3

Listener = Callable[["WorkerRecord", WorkerState, WorkerState], None]


@dataclasses.dataclass
class WorkerRecord:
    id: str
    model: ModelConfig
    state: WorkerState = WorkerState.PENDING
    reason: str = "configured"
    state_since: float = 0.0
    process: WorkerProcess | None = None
    restarts: int = 0
    failure_times: list[float] = dataclasses.field(default_factory=list)
    consecutive_failures: int = 0
    last_exit: str = ""
    stderr_tail: list[str] = dataclasses.field(default_factory=list)
    stats: worker_pb2.WorkerStats | None = None
    next_attempt_at: float = 0.0
    stop_deadline: float = 0.0
    started_at: float = 0.0
    last_probe_at: float = 0.0
    last_probe_ok_at: float = 0.0
    probe_failures: int = 0
    probing: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid if self.process and self.state in PROCESS_STATES else 0


class Fleet:
    def __init__(
        self,
        config: Config,
        run_dir: pathlib.Path,
        worker_env: Callable[[ModelConfig], dict[str, str]],
        listener: Listener,
        policy: RestartPolicy = RestartPolicy(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._run_dir = run_dir
        self._worker_env = worker_env
        self._listener = listener
        self._policy = policy
        self._clock = clock
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._socket_numbers = itertools.count()
        self.workers: dict[str, WorkerRecord] = {}
        for model in config.models:
            for index in range(model.replicas):
                worker_id = f"{model.name}-{index}"
                self.workers[worker_id] = WorkerRecord(id=worker_id, model=model, state_since=clock())

    def workers_of(self, model_name: str) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.model.name == model_name]

    # -- the one door for state changes ---------------------------------

    def _transition(self, worker: WorkerRecord, new: WorkerState, reason: str) -> None:
        old = worker.state
        check_transition(old, new)
        worker.state, worker.reason, worker.state_since = new, reason, self._clock()
        pid = worker.process.pid if worker.process else 0
        log.info("worker %s pid=%s %s -> %s: %s", worker.id, pid or "-", old.value, new.value, reason)
        self._listener(worker, old, new)

    # -- the periodic door ----------------------------------------------

    async def run(self) -> None:
        """Drives deadlines until stop_all() has finished."""
        while not self._stopping:
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        now = self._clock()
        for worker in list(self.workers.values()):
            handler = _TICK_HANDLERS.get(worker.state)
            if handler:
                handler(self, worker, now)

    def _tick_pending(self, worker: WorkerRecord, now: float) -> None:
        if not self._stopping:
            self._spawn(worker)

    def _tick_starting(self, worker: WorkerRecord, now: float) -> None:
        if now - worker.started_at > worker.model.load_timeout_s:
            worker.reason = f"not ready within load_timeout {worker.model.load_timeout_s:g}s: killed as hung"
            log.warning("worker %s %s", worker.id, worker.reason)
            worker.process.send_signal(signal.SIGKILL)
        elif not worker.probing:
            self._probe(worker, now)

    def _tick_ready(self, worker: WorkerRecord, now: float) -> None:
        interval = self._config.daemon.health_interval_s
        if not worker.probing and now - worker.last_probe_at >= interval:
            self._probe(worker, now)
        silent_for = now - worker.last_probe_ok_at
        if worker.probe_failures >= HEALTH_FAILURES_BEFORE_KILL and silent_for > self._config.daemon.health_timeout_s:
            worker.reason = f"no answer to health probes for {silent_for:.1f}s: killed as hung"
            log.warning("worker %s %s", worker.id, worker.reason)
            worker.process.send_signal(signal.SIGKILL)
            worker.probe_failures = 0

    def _tick_backoff(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.next_attempt_at and not self._stopping:
            self._transition(worker, WorkerState.PENDING, "backoff expired; restarting")

    def _tick_draining(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.stop_deadline:
            worker.process.send_signal(signal.SIGKILL)

    # -- actions ----------------------------------------------------------

    def _spawn(self, worker: WorkerRecord) -> None:
        socket_path = str(self._run_dir / f"{next(self._socket_numbers)}.sock")  # short: sun_path is ~104 bytes
        model = worker.model
        spec = {
            "worker_id": worker.id, "socket": socket_path, "backend": model.backend, "path": model.path,
            "factory": model.factory, "device": model.device, "threads": model.threads,
            "concurrency": model.concurrency, "parent_pid": os.getpid(),
            "stop_grace_s": self._config.daemon.stop_timeout_s / 2,
        }
        if worker.process is not None:
            self._background(worker.process.close_channel())
        worker.process = WorkerProcess(worker.id, spec, self._worker_env(model))
        worker.stats = None
        worker.probe_failures = 0
        worker.started_at = self._clock()
        self._transition(worker, WorkerState.STARTING, "admitted; loading the model")
        self._background(self._start_and_reap(worker, worker.process))

    async def _start_and_reap(self, worker: WorkerRecord, process: WorkerProcess) -> None:
        try:
            await process.start()
        except OSError as exc:
            self._on_exit(worker, process, None, f"could not exec the worker: {exc}")
            return
        log.info("worker %s pid=%s spawned", worker.id, process.pid)
        returncode = await process.wait()
        self._on_exit(worker, process, returncode, "")

    def _probe(self, worker: WorkerRecord, now: float) -> None:
        worker.probing, worker.last_probe_at = True, now
        self._background(self._probe_once(worker, worker.process))

    async def _probe_once(self, worker: WorkerRecord, process: WorkerProcess) -> None:
        timeout = READY_PROBE_TIMEOUT_S if worker.state == WorkerState.STARTING else self._config.daemon.health_timeout_s
        try:
            if process.stub is None or not os.path.exists(process.socket_path):
                raise ConnectionError("socket not there yet")
            stats = await process.stub.Stats(worker_pb2.StatsRequest(), timeout=timeout)
        except (grpc.aio.AioRpcError, ConnectionError):
            if worker.process is process and worker.state == WorkerState.READY:
                worker.probe_failures += 1
            return
        finally:
            worker.probing = False
        if worker.process is not process:
            return
        worker.stats, worker.probe_failures, worker.last_probe_ok_at = stats, 0, self._clock()
        if worker.state == WorkerState.STARTING:
            elapsed = self._clock() - worker.started_at
            self._transition(worker, WorkerState.READY, f"model loaded and warmed in {elapsed:.1f}s on {stats.device}")

    # -- the exit door ----------------------------------------------------

    def _on_exit(self, worker: WorkerRecord, process: WorkerProcess, returncode: int | None, spawn_error: str) -> None:
        if worker.process is not process:
            return
        worker.stderr_tail = list(process.stderr_tail)
        stop_requested = worker.state == WorkerState.DRAINING
        if returncode is None:
            verdict_kind, description = ExitKind.BOOT_FAILURE, spawn_error
        else:
            verdict = classify_exit(returncode, worker.stderr_tail, stop_requested=stop_requested)
            verdict_kind, description = verdict.kind, verdict.description
        if worker.reason.endswith("killed as hung"):
            description = f"{worker.reason} ({description})"
        worker.last_exit = f"{verdict_kind.value}: {description}"
        if stop_requested or self._stopping:
            self._transition(worker, WorkerState.STOPPED, f"stopped ({description})")
        elif verdict_kind == ExitKind.BOOT_FAILURE:
            self._transition(worker, WorkerState.FATAL, f"boot failure, not retried: {description}")
        else:
            self._after_failure(worker, verdict_kind, description)

    def _after_failure(self, worker: WorkerRecord, kind: ExitKind, description: str) -> None:
        now = self._clock()
        was_ready = worker.state == WorkerState.READY
        worker.consecutive_failures = 1 if was_ready else worker.consecutive_failures + 1
        if not was_ready:
            worker.failure_times.append(now)
        if should_give_up(worker.failure_times, now, self._policy):
            self._transition(
                worker, WorkerState.FATAL,
                f"{len(worker.failure_times)} failures without becoming ready; giving up. Last: {description}",
            )
            return
        delay = restart_delay(worker.consecutive_failures, self._policy)
        worker.next_attempt_at = now + delay
        worker.restarts += 1
        target = WorkerState.OOM if kind == ExitKind.OOM else WorkerState.BACKOFF
        self._transition(worker, target, f"{description}; restarting in {delay:.1f}s")

    def _tick_oom(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.next_attempt_at and not self._stopping:
            self._transition(worker, WorkerState.PENDING, "retrying after out-of-memory")

    # -- stopping ---------------------------------------------------------

    async def stop_all(self, timeout_s: float) -> None:
        """TERM every live worker, KILL those still there after timeout_s, wait for all."""
        self._stopping = True
        deadline = self._clock() + timeout_s
        for worker in self.workers.values():
            if worker.state in (WorkerState.STARTING, WorkerState.READY):
                worker.stop_deadline = deadline
                self._transition(worker, WorkerState.DRAINING, "daemon is stopping")
                worker.process.send_signal(signal.SIGTERM)
            elif worker.state in (WorkerState.PENDING, WorkerState.BACKOFF, WorkerState.OOM, WorkerState.REFUSED):
                self._transition(worker, WorkerState.STOPPED, "daemon is stopping")
        while any(w.state in PROCESS_STATES for w in self.workers.values()):
            for worker in self.workers.values():
                if worker.state == WorkerState.DRAINING:
                    self._tick_draining(worker, self._clock())
            await asyncio.sleep(TICK_S)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.process.close_channel() for w in self.workers.values() if w.process))

    def _background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


_TICK_HANDLERS = {
    WorkerState.PENDING: Fleet._tick_pending,
    WorkerState.STARTING: Fleet._tick_starting,
    WorkerState.READY: Fleet._tick_ready,
    WorkerState.BACKOFF: Fleet._tick_backoff,
    WorkerState.OOM: Fleet._tick_oom,
    WorkerState.DRAINING: Fleet._tick_draining,
}
