"""The fleet: every worker's lifecycle, owned in one place.

Only this module assigns a worker's state and reason, through
`_transition`, which checks the move is legal, records why and when, logs one
line and tells the listener (the router). Causes arrive by three doors: a
process exited (`_on_exit`), the periodic `tick` for deadlines and admission,
and an operator's command, all on the event loop. Readers (status, metrics)
get a read-only `snapshot()`.

What is not the lifecycle itself is a part the fleet composes and hands only
what it needs, `_transition` among it, so each is read and tested alone:
`health` (probes, the hung kill, learned footprints), `commands` (the
operator's scale, restart, drain, reload), `demand` (starts and stops for
the router's traffic), `caches` (prefix cache budgets admission shrinks),
`devices` (memory read per device, and placement) and `admission` (the pass
that places and admits waiting workers). Spawning, exits and stopping stay
here, where the records are.

Processes come from an injected launcher (`WorkerProcess` by default), so the
lifecycle is unit-tested with a fake one and a fake clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import pathlib
import signal
import time
from collections.abc import Callable

from mpsd.config import Config, ModelConfig
from mpsd.supervisor.fleet.admitting import AdmissionPass
from mpsd.supervisor.fleet.backoff import RestartPolicy, restart_delay, should_give_up
from mpsd.supervisor.fleet.balancer import DemandBalancer, ModelLoad
from mpsd.supervisor.fleet.cache_budgets import CacheBudgets
from mpsd.supervisor.fleet.commands import OperatorCommands
from mpsd.supervisor.fleet.devices import FleetDevices
from mpsd.supervisor.fleet.exits import ExitKind, classify_exit
from mpsd.supervisor.fleet.health import WorkerHealth
from mpsd.supervisor.fleet.process import WorkerProcess
from mpsd.supervisor.fleet.records import CONFIGURED, AfterStop, ModelCounts, WorkerRecord
from mpsd.supervisor.fleet.snapshot import FleetSnapshot, view_memory, view_models, view_worker
from mpsd.supervisor.fleet.states import PROCESS_STATES, WorkerState, check_transition
from mpsd.supervisor.fleet.worker_env import device_env, worker_spec
from mpsd.supervisor.memory import process_memory
from mpsd.supervisor.memory.footprint import Footprint, estimate_bytes, estimate_cache_bytes
from mpsd.units import format_bytes
from mpsd.worker_spec import WorkerSpec

log = logging.getLogger("mpsd.fleet")
TICK_S = 0.1

Listener = Callable[[WorkerRecord, WorkerState, WorkerState], None]
Launcher = Callable[[WorkerSpec, dict[str, str]], WorkerProcess]


class Fleet:
    """Owns the records; `health`, `commands` and `demand` are its parts, each given only the doors it uses."""

    def __init__(
        self,
        config: Config,
        run_dir: pathlib.Path,
        worker_env: Callable[[ModelConfig], dict[str, str]],
        listener: Listener,
        probe,
        clock: Callable[[], float] = time.monotonic,
        footprint_of_pid: Callable[[int], int] | None = None,  # default: memory_of_pid's footprint
        memory_of_pid: Callable[[int], process_memory.ProcessMemory] | None = None,  # default: a MemoryReader
        report_working_set: Callable[[int], None] = lambda value: None,
        launch: Launcher = WorkerProcess,
        load_of: Callable[[str], ModelLoad | None] = lambda name: None,
    ) -> None:
        self.config = config
        self._run_dir = run_dir
        self._worker_env = worker_env
        self._listener = listener
        self.probe = probe
        self._policy = RestartPolicy.from_config(config.daemon)
        self._clock = clock
        footprint_of_pid, self._memory_of_pid = process_memory.pid_readers(footprint_of_pid, memory_of_pid)
        self._launch = launch
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        self._socket_numbers = itertools.count()
        self._next_index: dict[str, int] = {}
        self.models: dict[str, ModelConfig] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self._footprints: dict[str, Footprint] = {}
        self._counts: dict[str, ModelCounts] = {}
        self.health = WorkerHealth(
            self.workers, transition=self._transition, background=self._background, footprints=self._footprints,
            count=self._count, interval_s=config.daemon.health_interval_s, timeout_s=config.daemon.health_timeout_s,
            clock=clock, footprint_of_pid=footprint_of_pid, report_working_set=report_working_set)
        self.commands = OperatorCommands(self.models, self.workers, transition=self._transition,
                                         add_worker=self._add_worker, add_model=self._add_model,
                                         stop_worker=self._stop_worker)
        self.devices = FleetDevices(self.workers, probe=lambda: self.probe, memory_config=lambda: self.config.memory,
                                    counted_bytes=lambda w: self.footprint_of(w) - self.caches.shrunk_by(w))
        self.demand = DemandBalancer(
            self.models, self.workers, load_of=load_of, footprints=self._footprints, count=self._count,
            add_worker=self._add_worker, stop_worker=self._stop_worker, room=self._room,
            stopping=lambda: self._stopping)
        self.caches = CacheBudgets(self.workers, footprints=self._footprints, send_budget=self.health.send_budget,
                                   devices=self.devices, settling=lambda d, looks: self.admission.settling(d, looks))
        self.admission = AdmissionPass(self.workers, devices=self.devices, caches=self.caches,
                                       footprint_of=self.footprint_of, transition=self._transition,
                                       spawn=self._spawn, blocked=self.demand.blocked)
        self._on_tick = {WorkerState.STARTING: self.health.watch_starting, WorkerState.READY: self.health.watch_ready,
                         WorkerState.BACKOFF: self._tick_backoff, WorkerState.DRAINING: self._tick_draining}
        for model in config.models:
            self._add_model(model)

    def footprint_of(self, worker: WorkerRecord) -> int:
        return self._footprints[worker.model.name].bytes

    def _count(self, model_name: str) -> ModelCounts:
        return self._counts.setdefault(model_name, ModelCounts())

    def _room(self, device: str) -> tuple[int, int]:
        """Demand's room on a device: free for one more worker as admission counts it, and what shrinking live
        prefix caches there would add; (0, 0) when the probe fails."""
        looks = self.devices.read()
        if looks is None or device not in looks:
            return 0, 0
        return self.devices.free_bytes(device, looks), self.caches.reclaimable(device, looks)

    def snapshot(self) -> FleetSnapshot:
        """What status and metrics show, memory read now (admission reads it only while a worker waits)."""
        reading = view_memory(self.probe.name, self.devices, self.devices.read(), self.config.memory)
        now = self._clock()
        workers = tuple(view_worker(w, now, self._memory_of_pid(w.pid)) for w in self.workers.values())
        models = view_models(self.models, self._footprints, self._counts, list(self.workers.values()),
                             self.demand.last_changes, workers)
        return FleetSnapshot(reading, models, workers)

    def apply_config(self, new: Config) -> str:
        """Reload: the operator's command changes the models (`commands.reload`); the fleet keeps the config.

        [daemon] keeps its values until the next start (timings, restart policy
        and ports are read once), as the reload's answer tells the operator.
        """
        message = self.commands.reload(new.models)
        self.config = dataclasses.replace(new, daemon=self.config.daemon, models=tuple(self.models.values()))
        return message

    # -- the one door for state changes ---------------------------------

    def _transition(self, worker: WorkerRecord, new: WorkerState, reason: str) -> None:
        """A move to the state it is already in only updates the reason (numbers that moved), quietly."""
        old = worker.state
        if new == old:
            worker.reason = reason
            return
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
            handler = self._on_tick.get(worker.state)
            if handler:
                handler(worker, now)
        if not self._stopping:
            self.demand.balance(now, self.config.memory.min_residency_s)
            self.admission.run()
            self.caches.give_back()

    def _tick_backoff(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.next_attempt_at and not self._stopping:
            self._transition(worker, WorkerState.PENDING, "backoff expired; waiting for admission")

    def _tick_draining(self, worker: WorkerRecord, now: float) -> None:
        if now >= worker.stop_deadline:
            worker.process.send_signal(signal.SIGKILL)

    # -- processes --------------------------------------------------------

    def _spawn(self, worker: WorkerRecord, reason: str) -> None:
        model = worker.model
        if worker.process is not None:
            self._background(worker.process.close_channel())
        worker.process = self._launch(self._spec_for(worker), {**self._worker_env(model),
                                                               **device_env(model, worker.device)})
        worker.stats, worker.probe_failures, worker.peak_bytes, worker.oom_events_seen = None, 0, 0, 0
        worker.kill_cause, worker.kill_detail = None, ""
        worker.started_at = self._clock()
        worker.starts += 1
        if worker.starts > 1:
            self._count(model.name).restarts += 1
        self._transition(worker, WorkerState.STARTING, f"{reason}; loading the model")
        self._background(self._start_and_reap(worker, worker.process))

    def _spec_for(self, worker: WorkerRecord) -> WorkerSpec:
        socket = self._run_dir / f"{next(self._socket_numbers)}.sock"
        return worker_spec(worker.id, worker.model, socket, self.config.daemon.drain_grace_s, worker.device)

    async def _start_and_reap(self, worker: WorkerRecord, process: WorkerProcess) -> None:
        try:
            await process.start()
        except OSError as exc:
            self._on_exit(worker, process, None, f"could not exec the worker: {exc}")
            return
        log.info("worker %s pid=%s spawned", worker.id, process.pid)
        returncode = await process.wait()
        self._on_exit(worker, process, returncode, "")

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
        if worker.kill_cause is not None and kind == ExitKind.KILLED:
            description = f"{worker.kill_detail}: killed as hung"  # our own SIGKILL: say why, not "from outside"
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
        footprint = self._footprints[worker.model.name]
        footprint.raise_after_oom(worker.peak_bytes)
        self._count(worker.model.name).oom_exits += 1
        looks = self.devices.read()
        worker.free_at_oom = self.devices.free_around(worker, looks)[1] if looks else 0
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
        action, worker.after_stop = worker.after_stop, AfterStop.STAY
        if action == AfterStop.RESTART and not self._stopping:
            self._transition(worker, WorkerState.PENDING, "restarted by operator; waiting for admission")
        elif action == AfterStop.REMOVE:
            del self.workers[worker.id]

    def _add_model(self, model: ModelConfig) -> None:
        self.models[model.name] = model
        estimate = estimate_bytes(model.path)
        cache = estimate_cache_bytes(model.prefix_cache_bytes, model.prefix_cache_fraction, estimate)
        self._footprints[model.name] = Footprint(estimate + cache, model.footprint_bytes, estimated_cache_bytes=cache)
        self._next_index.setdefault(model.name, 0)
        for _ in range(model.replicas):
            self._add_worker(model)

    def _add_worker(self, model: ModelConfig, reason: str = CONFIGURED) -> WorkerRecord:
        index = self._next_index[model.name]
        self._next_index[model.name] = index + 1
        worker = WorkerRecord(id=f"{model.name}-{index}", model=model, reason=reason, state_since=self._clock())
        self.workers[worker.id] = worker
        return worker

    def _stop_worker(self, worker: WorkerRecord, reason: str, after: AfterStop) -> None:
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
