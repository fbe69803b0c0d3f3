"""The fleet: every worker's lifecycle, owned in one place.

Only this module assigns a worker's state, through `_transition`, which
checks the move is legal, records why and when, logs one line and tells the
listener (the router). Causes arrive by three doors: a process exited
(`_on_exit`), the periodic `tick` for deadlines and admission, and an
operator's command (scale, restart, drain, reload), all on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
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
from mpsd.supervisor import admission
from mpsd.supervisor.backoff import RestartPolicy, restart_delay, should_give_up
from mpsd.supervisor.exits import ExitKind, classify_exit
from mpsd.supervisor.footprint import Footprint, estimate_bytes, worker_peak_bytes
from mpsd.supervisor.memory import MemorySnapshot, apply_overrides, process_footprint_bytes
from mpsd.supervisor.states import PROCESS_STATES, WorkerState, check_transition
from mpsd.supervisor.worker_process import WorkerProcess
from mpsd.units import format_bytes
from mpsd.v1 import worker_pb2

log = logging.getLogger("mpsd.fleet")
TICK_S = 0.1
READY_PROBE_TIMEOUT_S = 1.0
# A READY worker is killed as hung once it has been silent for health_timeout
# and at least this many probes (each given half of health_timeout) failed:
# one slow answer under load is not a hang, two in a row that long is.
HEALTH_FAILURES_BEFORE_KILL = 2
LOSS_EXPLAIN_POLL_S = 0.02
# Backend figures that carry Metal's recommended working set (only a worker can read it).
WORKING_SET_KEYS = ("mps_recommended_max", "mlx_max_recommended_working_set")

Listener = Callable[["WorkerRecord", WorkerState, WorkerState], None]


class ControlError(Exception):
    """An operator command that cannot be done; the message says why."""


@dataclasses.dataclass
class WorkerRecord:
    id: str
    model: ModelConfig
    state: WorkerState = WorkerState.PENDING
    reason: str = "configured; waiting for admission"
    state_since: float = 0.0
    process: WorkerProcess | None = None
    starts: int = 0
    failure_times: list[float] = dataclasses.field(default_factory=list)
    consecutive_failures: int = 0
    last_exit: str = ""
    stderr_tail: list[str] = dataclasses.field(default_factory=list)
    stats: worker_pb2.WorkerStats | None = None
    peak_bytes: int = 0
    oom_events_seen: int = 0
    free_at_oom: int = 0
    next_attempt_at: float = 0.0
    stop_deadline: float = 0.0
    started_at: float = 0.0
    ready_at: float = 0.0
    last_probe_at: float = 0.0
    last_probe_ok_at: float = 0.0
    probe_failures: int = 0
    probing: bool = False
    after_stop: str = ""  # "restart" or "remove": what an operator asked for once it has stopped

    @property
    def pid(self) -> int:
        return self.process.pid if self.process and self.state in PROCESS_STATES else 0

    @property
    def restarts(self) -> int:
        """Start attempts after the first."""
        return max(self.starts - 1, 0)


class Fleet:
    def __init__(
        self,
        config: Config,
        run_dir: pathlib.Path,
        worker_env: Callable[[ModelConfig], dict[str, str]],
        listener: Listener,
        probe,
        clock: Callable[[], float] = time.monotonic,
        footprint_of_pid: Callable[[int], int] = process_footprint_bytes,
        report_working_set: Callable[[int], None] = lambda value: None,
    ) -> None:
        self.config = config
        self._run_dir = run_dir
        self._worker_env = worker_env
        self._listener = listener
        self.probe = probe
        self._policy = RestartPolicy.from_config(config.daemon)
        self._clock = clock
        self._footprint_of_pid = footprint_of_pid
        self._report_working_set = report_working_set
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._socket_numbers = itertools.count()
        self._next_index: dict[str, int] = {}
        self.models: dict[str, ModelConfig] = {}
        self.footprints: dict[str, Footprint] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.memory: MemorySnapshot | None = None
        self.memory_error = ""
        # Per model, only ever growing (metrics): a worker removed by scale-down or reload keeps its counts here.
        self.restarts_by_model: collections.Counter[str] = collections.Counter()
        self.oom_exits_by_model: collections.Counter[str] = collections.Counter()
        self.request_ooms_by_model: collections.Counter[str] = collections.Counter()
        for model in config.models:
            self._add_model(model)

    def workers_of(self, model_name: str) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.model.name == model_name]

    def footprint_of(self, worker: WorkerRecord) -> int:
        return self.footprints[worker.model.name].bytes

    def live_footprints(self, excluding: WorkerRecord | None = None) -> list[int]:
        """What admission counts as held: the footprint of every worker that has a process."""
        return [self.footprint_of(w) for w in self.workers.values() if w.state in PROCESS_STATES and w is not excluding]

    # -- the one door for state changes ---------------------------------

    def _transition(self, worker: WorkerRecord, new: WorkerState, reason: str) -> None:
        old = worker.state
        check_transition(old, new)
        worker.state, worker.reason, worker.state_since = new, reason, self._clock()
        pid = worker.process.pid if worker.process else 0
        log.info("worker %s pid=%s %s -> %s: %s", worker.id, pid or "-", old.value, new.value, reason, extra={
            "worker": worker.id, "model": worker.model.name, "pid": pid, "state": new.value, "from_state": old.value,
            "reason": reason})
        self._listener(worker, old, new)

    # -- the periodic door ----------------------------------------------

    async def run(self) -> None:
        """Drives deadlines and admission until stop_all() has begun."""
        while not self._stopping:
            self.tick()
            await asyncio.sleep(TICK_S)

    def tick(self) -> None:
        now = self._clock()
        for worker in list(self.workers.values()):
            handler = _TICK_HANDLERS.get(worker.state)
            if handler:
                handler(self, worker, now)
        if not self._stopping:
            self._admit()

    def _tick_starting(self, worker: WorkerRecord, now: float) -> None:
        if now - worker.started_at > worker.model.load_timeout_s:
            worker.reason = f"not ready within load_timeout {worker.model.load_timeout_s:g}s: killed as hung"
            log.warning("worker %s %s", worker.id, worker.reason)
            worker.process.send_signal(signal.SIGKILL)
        elif not worker.probing:
            self._probe(worker, now)

    def _tick_ready(self, worker: WorkerRecord, now: float) -> None:
        if not worker.probing and now - worker.last_probe_at >= self.config.daemon.health_interval_s:
            self._probe(worker, now)
        silent_for = now - worker.last_probe_ok_at
        if worker.probe_failures >= HEALTH_FAILURES_BEFORE_KILL and silent_for >= self.config.daemon.health_timeout_s:
            worker.reason = f"no answer to health probes for {silent_for:.1f}s: killed as hung"
            log.warning("worker %s %s", worker.id, worker.reason)
            worker.process.send_signal(signal.SIGKILL)
            worker.probe_failures = 0

    def _tick_backoff(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.next_attempt_at and not self._stopping:
            self._transition(worker, WorkerState.PENDING, "backoff expired; waiting for admission")

    def _tick_draining(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.stop_deadline:
            worker.process.send_signal(signal.SIGKILL)

    # -- admission --------------------------------------------------------

    def _admit(self) -> None:
        """Applies the pure admission decision to PENDING, REFUSED and OOM workers."""
        waiting = [w for w in self.workers.values() if w.state in (WorkerState.PENDING, WorkerState.REFUSED, WorkerState.OOM)]
        if not waiting:
            return
        view = self.read_memory()
        if view is None:
            for worker in waiting:
                if worker.state == WorkerState.PENDING:
                    self._transition(worker, WorkerState.REFUSED, f"memory probe failed: {self.memory_error}")
            return
        live = self.live_footprints()
        free = admission.free_bytes(view, live)
        self._retry_ooms(free, view.budget_bytes)
        candidates = [admission.Candidate(w.id, self.footprint_of(w)) for w in self.workers.values()
                      if w.state in (WorkerState.PENDING, WorkerState.REFUSED)]
        settling = next((w.id for w in self.workers.values() if w.state == WorkerState.STARTING), None)
        for decision in admission.decide(view, live, candidates, settling):
            self._apply_decision(self.workers[decision.worker_id], decision)

    def read_memory(self) -> admission.MemoryView | None:
        """Reads the probe now and keeps the snapshot in `memory` (None and `memory_error` when it fails)."""
        try:
            self.memory = apply_overrides(self.probe.snapshot(), self.config.memory)
        except (OSError, ValueError, KeyError) as exc:
            if str(exc) != self.memory_error:
                log.warning("memory probe %s failed: %s", self.probe.name, exc)
            self.memory_error = str(exc)
            return None
        self.memory_error = ""
        return admission.MemoryView(self.memory.budget_bytes, self.memory.used_bytes, self.config.memory.headroom_bytes)

    def _retry_ooms(self, free: int, budget_bytes: int) -> None:
        """One new attempt per real change in memory, never a loop into the same wall."""
        for worker in self.workers.values():
            if worker.state != WorkerState.OOM:
                continue
            if admission.oom_retry_due(free, worker.free_at_oom, self.footprint_of(worker), budget_bytes):
                self._transition(worker, WorkerState.PENDING,
                                 f"memory freed ({format_bytes(max(free, 0))} free now); trying once more")

    def _apply_decision(self, worker: WorkerRecord, decision: admission.Decision) -> None:
        if decision.admit:
            if worker.state == WorkerState.REFUSED:
                self._transition(worker, WorkerState.PENDING, "memory freed; " + decision.reason)
            self._spawn(worker, decision.reason)
        elif worker.state == WorkerState.PENDING:
            self._transition(worker, WorkerState.REFUSED, decision.reason)
        else:
            worker.reason = decision.reason  # still refused; the numbers moved

    # -- processes --------------------------------------------------------

    def _spawn(self, worker: WorkerRecord, reason: str) -> None:
        model = worker.model
        spec = {
            "worker_id": worker.id, "socket": str(self._run_dir / f"{next(self._socket_numbers)}.sock"),
            "backend": model.backend, "path": model.path, "factory": model.factory, "device": model.device,
            "threads": model.threads, "concurrency": model.concurrency, "parent_pid": os.getpid(),
            "stop_grace_s": self.config.daemon.drain_grace_s,
            "mlx_memory_limit": model.memory_limit_bytes, "mlx_wired_limit": model.wired_limit_bytes,
            "mlx_cache_limit": model.cache_limit_bytes,
        }
        if worker.process is not None:
            self._background(worker.process.close_channel())
        worker.process = WorkerProcess(worker.id, spec, self._worker_env(model))
        worker.stats, worker.probe_failures, worker.peak_bytes, worker.oom_events_seen = None, 0, 0, 0
        worker.started_at = self._clock()
        worker.starts += 1
        if worker.starts > 1:
            self.restarts_by_model[model.name] += 1
        self._transition(worker, WorkerState.STARTING, f"{reason}; loading the model")
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
        timeout = READY_PROBE_TIMEOUT_S if worker.state == WorkerState.STARTING else self.config.daemon.health_timeout_s / 2
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
        if worker.process is not process or worker.state not in (WorkerState.STARTING, WorkerState.READY):
            return
        worker.probe_failures, worker.last_probe_ok_at = 0, self._clock()
        self.record_stats(worker, stats)
        if worker.state == WorkerState.STARTING:
            elapsed = self._clock() - worker.started_at
            worker.ready_at = self._clock()
            self._transition(worker, WorkerState.READY, f"model loaded and warmed in {elapsed:.1f}s on {stats.device}")

    def record_stats(self, worker: WorkerRecord, stats: worker_pb2.WorkerStats) -> None:
        """Learns the model's footprint from what the worker holds, and OOMs it survived."""
        worker.stats = stats
        working_set = max((stats.backend_memory.get(k, 0) for k in WORKING_SET_KEYS), default=0)
        if working_set:
            self._report_working_set(working_set)
        peak = worker_peak_bytes(self._footprint_of_pid(worker.pid), dict(stats.backend_memory))
        worker.peak_bytes = max(worker.peak_bytes, peak)
        footprint = self.footprints[worker.model.name]
        footprint.observe(worker.peak_bytes)
        if stats.oom_events > worker.oom_events_seen:
            self.request_ooms_by_model[worker.model.name] += stats.oom_events - worker.oom_events_seen
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

    # -- the exit door ----------------------------------------------------

    def _on_exit(self, worker: WorkerRecord, process: WorkerProcess, returncode: int | None, spawn_error: str) -> None:
        if worker.process is not process or worker.id not in self.workers:
            return
        worker.stderr_tail = list(process.stderr_tail)
        stop_requested = worker.state == WorkerState.DRAINING
        if returncode is None:
            kind, description = ExitKind.BOOT_FAILURE, spawn_error
        else:
            verdict = classify_exit(returncode, worker.stderr_tail, stop_requested=stop_requested)
            kind, description = verdict.kind, verdict.description
        if worker.reason.endswith("killed as hung") and kind == ExitKind.KILLED:
            description = worker.reason  # our own SIGKILL: say why, not "from outside"
        worker.last_exit = f"{kind.value}: {description}"
        if stop_requested or self._stopping:
            self._transition(worker, WorkerState.STOPPED, f"stopped ({description})")
            self._after_stop(worker)
        elif kind == ExitKind.BOOT_FAILURE:
            self._transition(worker, WorkerState.FATAL, f"boot failure, not retried: {description}")
        elif kind == ExitKind.OOM:
            self._after_oom(worker, description)
        else:
            self._after_failure(worker, description)

    def _after_oom(self, worker: WorkerRecord, description: str) -> None:
        footprint = self.footprints[worker.model.name]
        footprint.raise_after_oom(worker.peak_bytes)
        self.oom_exits_by_model[worker.model.name] += 1
        view = self.read_memory()
        worker.free_at_oom = admission.free_bytes(view, self.live_footprints(excluding=worker)) if view else 0
        self._transition(worker, WorkerState.OOM, (
            f"{description}; {worker.model.name} footprint raised to {format_bytes(footprint.bytes)} "
            f"({footprint.source}); not restarted until memory frees"))

    def _after_failure(self, worker: WorkerRecord, description: str) -> None:
        now = self._clock()
        was_ready = worker.state == WorkerState.READY
        if was_ready and now - worker.ready_at >= self._policy.reset_after_s:
            worker.consecutive_failures, worker.failure_times = 0, []
        worker.consecutive_failures += 1
        if not was_ready:
            worker.failure_times.append(now)
        if should_give_up(worker.failure_times, now, self._policy):
            self._transition(worker, WorkerState.FATAL, (
                f"{len(worker.failure_times)} failures within {self._policy.window_s:g}s without becoming ready; "
                f"giving up. Last: {description}"))
            return
        delay = restart_delay(worker.consecutive_failures, self._policy)
        worker.next_attempt_at = now + delay
        self._transition(worker, WorkerState.BACKOFF, f"{description}; restarting in {delay:.1f}s")

    def _after_stop(self, worker: WorkerRecord) -> None:
        action, worker.after_stop = worker.after_stop, ""
        if action == "restart" and not self._stopping:
            self._transition(worker, WorkerState.PENDING, "restarted by operator; waiting for admission")
        elif action == "remove":
            del self.workers[worker.id]

    # -- operator commands ------------------------------------------------

    def scale(self, model_name: str, replicas: int) -> str:
        if model_name not in self.models:
            raise ControlError(f"no model named {model_name!r} (configured: {', '.join(sorted(self.models))})")
        current = [w for w in self.workers_of(model_name) if w.after_stop != "remove"]
        self.models[model_name] = dataclasses.replace(self.models[model_name], replicas=replicas)
        if replicas > len(current):
            added = [self._add_worker(self.models[model_name]).id for _ in range(replicas - len(current))]
            return f"{model_name}: {len(current)} -> {replicas} replicas; added {', '.join(added)}"
        retired = sorted(current, key=lambda w: _index(w.id))[replicas:]
        for worker in retired:
            self._stop_worker(worker, "scaled down", after="remove")
        names = ", ".join(w.id for w in retired) or "none"
        return f"{model_name}: {len(current)} -> {replicas} replicas; stopping {names}"

    def restart_worker(self, worker_id: str) -> str:
        worker = self._worker(worker_id)
        if worker.state in PROCESS_STATES:
            if worker.state == WorkerState.DRAINING:
                worker.after_stop = "restart"
                return f"{worker_id} is already draining; it will start again once stopped"
            self._stop_worker(worker, "restart requested by operator", after="restart")
            return f"{worker_id}: draining pid {worker.process.pid}; a fresh worker starts once it has stopped"
        worker.failure_times, worker.consecutive_failures = [], 0
        if worker.state != WorkerState.PENDING:
            self._transition(worker, WorkerState.PENDING, "restart requested by operator; waiting for admission")
        return f"{worker_id}: was {worker.reason}; now waiting for admission"

    def drain_worker(self, worker_id: str) -> str:
        worker = self._worker(worker_id)
        if worker.state in (WorkerState.STOPPED, WorkerState.DRAINING):
            raise ControlError(f"{worker_id} is already {worker.state.value}")
        self._stop_worker(worker, "drained by operator", after="")
        return f"{worker_id}: draining; it finishes its requests in flight and stays STOPPED"

    def apply_config(self, new: Config) -> str:
        """Reload: adds, removes and resizes models; workers of unchanged models are not touched."""
        changes = []
        new_models = {m.name: m for m in new.models}
        for name in list(self.models):
            if name not in new_models:
                for worker in self.workers_of(name):
                    self._stop_worker(worker, "model removed from config", after="remove")
                del self.models[name]
                changes.append(f"removed {name}")
        for name, model in new_models.items():
            old = self.models.get(name)
            if old is None:
                self._add_model(model)
                changes.append(f"added {name} ({model.replicas} replicas)")
            elif dataclasses.replace(old, replicas=model.replicas) != model:
                for worker in self.workers_of(name):
                    self._stop_worker(worker, "model config changed; replacing", after="remove")
                self._add_model(model)
                changes.append(f"replaced {name}")
            elif old.replicas != model.replicas:
                changes.append(self.scale(name, model.replicas))
        self.config = dataclasses.replace(new, models=tuple(self.models.values()))
        return "; ".join(changes) or "no model changed"

    def _worker(self, worker_id: str) -> WorkerRecord:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise ControlError(f"no worker {worker_id!r} (workers: {', '.join(self.workers)})")
        return worker

    def _add_model(self, model: ModelConfig) -> None:
        self.models[model.name] = model
        self.footprints[model.name] = Footprint(estimate_bytes(model.path), model.footprint_bytes)
        self._next_index.setdefault(model.name, 0)
        for _ in range(model.replicas):
            self._add_worker(model)

    def _add_worker(self, model: ModelConfig) -> WorkerRecord:
        index = self._next_index[model.name]
        self._next_index[model.name] = index + 1
        worker = WorkerRecord(id=f"{model.name}-{index}", model=model, state_since=self._clock())
        self.workers[worker.id] = worker
        return worker

    def _stop_worker(self, worker: WorkerRecord, reason: str, after: str) -> None:
        """Live workers drain (SIGTERM: the worker finishes its requests); others stop at once."""
        worker.after_stop = after
        if worker.state in (WorkerState.STARTING, WorkerState.READY):
            grace = self.config.daemon.drain_grace_s + self.config.daemon.stop_timeout_s
            worker.stop_deadline = self._clock() + grace
            self._transition(worker, WorkerState.DRAINING, reason)
            worker.process.send_signal(signal.SIGTERM)
        elif worker.state not in (WorkerState.DRAINING, WorkerState.STOPPED):
            self._transition(worker, WorkerState.STOPPED, reason)
            self._after_stop(worker)
        elif worker.state == WorkerState.STOPPED:
            self._after_stop(worker)

    # -- stopping ---------------------------------------------------------

    async def stop_all(self, timeout_s: float) -> None:
        """TERM every live worker, KILL those still there after timeout_s, wait for all."""
        self._stopping = True
        deadline = self._clock() + timeout_s
        for worker in list(self.workers.values()):
            if worker.state in (WorkerState.STARTING, WorkerState.READY):
                self._transition(worker, WorkerState.DRAINING, "daemon is stopping")
                worker.process.send_signal(signal.SIGTERM)
            elif worker.state in (WorkerState.PENDING, WorkerState.BACKOFF, WorkerState.OOM, WorkerState.REFUSED):
                self._transition(worker, WorkerState.STOPPED, "daemon is stopping")
            worker.stop_deadline = min(worker.stop_deadline or deadline, deadline)
        while any(w.state in PROCESS_STATES for w in self.workers.values()):
            for worker in list(self.workers.values()):
                if worker.state == WorkerState.DRAINING:
                    self._tick_draining(worker, self._clock())
            await asyncio.sleep(TICK_S)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(w.process.close_channel() for w in self.workers.values() if w.process))

    def _background(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _index(worker_id: str) -> int:
    return int(worker_id.rpartition("-")[2])


_TICK_HANDLERS = {
    WorkerState.STARTING: Fleet._tick_starting,
    WorkerState.READY: Fleet._tick_ready,
    WorkerState.BACKOFF: Fleet._tick_backoff,
    WorkerState.DRAINING: Fleet._tick_draining,
}
