"""`mpsd serve`: wires config, fleet, router and the edge, then waits for a signal.

Runs in the foreground (launchd and supervisord need that). SIGTERM or
SIGINT drains: stop taking requests, let in-flight streams finish within
drain_grace, stop the workers, exit 0. A second signal skips the grace.
What each listener binds and refuses lives in edge/listeners.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import signal
import socket

import grpc
from grpc_health.v1 import health

import mpsd
from mpsd import paths
from mpsd.config import EMBEDDED_SOURCE, Config, load_config
from mpsd.supervisor.demo_build import ensure_demos, resolve_demo_paths
from mpsd.supervisor.edge.admin import AdminService
from mpsd.supervisor.edge.http.status_history import TransitionLines
from mpsd.supervisor.edge.http.status_page import StatusPage
from mpsd.supervisor.edge.inference import InferenceService
from mpsd.supervisor.edge.metrics import RequestMetrics, watch_daemon
from mpsd.supervisor.fleet.commands import ControlError
from mpsd.supervisor.fleet.fleet import Fleet
from mpsd.supervisor.fleet.records import WorkerRecord
from mpsd.supervisor.fleet.states import HOPEFUL_STATES, WorkerState
from mpsd.supervisor.fleet.worker_env import default_threads, worker_env
from mpsd.supervisor.listeners import ListenError, serving_status, start_admin, start_http, start_public
from mpsd.supervisor.memory.probes import ReportedWorkingSet, make_probe
from mpsd.supervisor.routing.pool import ModelPool, NoWorkers

REFUSAL_GRACE_S = 1.0  # after a drain, for calls still being refused when the port closes

log = logging.getLogger("mpsd")


class DaemonError(RuntimeError):
    """A reason the daemon cannot start (another one holds its state directory), worded for the operator."""


def prepare_config(config: Config, data_dir: pathlib.Path) -> tuple[Config, list[str]]:
    """Resolves '@demo'/'@mlx-demo' and per-worker thread counts; returns the demo references used."""
    config, demo_refs = resolve_demo_paths(config, data_dir)
    cpus = os.cpu_count() or 1
    models = tuple(dataclasses.replace(m, threads=default_threads(m, config.models, cpus)) for m in config.models)
    return dataclasses.replace(config, models=models), demo_refs


class Daemon:
    def __init__(self, config: Config, state_dir: pathlib.Path, listen: str, data_dir: pathlib.Path,
                 metrics_listen: str, http_listen: str = "") -> None:
        self.config, self._demo_refs = prepare_config(config, data_dir)
        self._data_dir = data_dir
        self.state_dir = state_dir
        self.listen = listen
        self.metrics_listen = metrics_listen
        self.http_listen = http_listen
        self.metrics = RequestMetrics()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._health = health.aio.HealthServicer()
        self.pools: dict[str, ModelPool] = {}
        self.fleet: Fleet | None = None
        self._inference: InferenceService | None = None
        self._admin: AdminService | None = None
        self.transitions = TransitionLines()  # the status page's "last transitions"

    async def run(self) -> int:
        paths.ensure_private_dir(self.state_dir)
        admin_path = paths.admin_socket_path(self.state_dir)
        paths.check_socket_path(admin_path)
        _claim_admin_socket(admin_path)
        run_dir = self.state_dir / "run"
        paths.check_socket_path(run_dir / "9999.sock")
        shutil.rmtree(run_dir, ignore_errors=True)  # a killed daemon's leftovers; no live daemon uses it
        paths.ensure_private_dir(run_dir)
        try:
            return await self._run(admin_path, run_dir)
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                admin_path.unlink()

    async def _run(self, admin_path: pathlib.Path, run_dir: pathlib.Path) -> int:
        self._install_signal_handlers()
        await ensure_demos(self._demo_refs, self._data_dir, worker_env(self.config.models[0]))
        self._working_set = ReportedWorkingSet()  # a Mac's Metal ceiling, as a worker reports it
        probe = make_probe(self.config.memory, working_set_bytes=self._working_set)
        self.fleet = Fleet(self.config, run_dir, worker_env, self._on_transition, probe,
                           report_working_set=self._working_set.set, load_of=self.pools.get)
        self._sync_pools()
        watch_daemon(self.metrics.registry, self.fleet, self.pools)
        self._inference = InferenceService(
            self.pools, lambda name: self.fleet.models[name].generates, self.fleet.health.explain_loss, self.metrics,
            self.config.daemon.stream_buffer)
        public, self.listen = await start_public(self.listen, self.config.daemon.access, self._inference,
                                                 self._health, self.config.models)
        self._publish_health(list(self.pools))
        try:
            http = await start_http({"http_listen": self.http_listen, "metrics_listen": self.metrics_listen},
                                    self.config.daemon, self._inference, self.metrics, self._status_page())
        except (ListenError, ValueError):
            await public.stop(0)  # a grpc server left running when the loop closes ends the process with a traceback
            raise
        admin = await start_admin(admin_path, self._admin_service())
        fleet_task = asyncio.create_task(self.fleet.run())
        log.info("mpsd %s serving %s from %s", mpsd.__version__, ", ".join(self.pools), self.config.source)
        await self._stop.wait()
        await self._drain(public, self.fleet)
        fleet_task.cancel()
        await admin.stop(0)
        if http:
            http.close()  # open through the drain, like the public port (new requests got 503), so a scrape can watch it
        log.info("mpsd stopped")
        return 0

    def _status_page(self) -> StatusPage:
        return StatusPage(self.fleet, self.pools, self.metrics, lambda: self._admin_service().Status(None, None),
                          transitions=self.transitions)

    def _sync_pools(self) -> None:
        """One pool per configured model; a removed model's queued requests are told so."""
        for name, model in self.fleet.models.items():
            pool = self.pools.get(name)
            if pool is None:
                self.pools[name] = ModelPool(name, model.concurrency, model.queue_limit,
                                             prospects=lambda name=name: self.fleet.demand.prospects(name),
                                             why_waiting=lambda name=name: self.fleet.demand.why_waiting(name),
                                             routing=model.routing, thresholds=self.config.daemon.routing)
            else:
                pool.reconfigure(model.concurrency, model.queue_limit, model.routing)
        removed = [n for n in self.pools if n not in self.fleet.models]
        for name in removed:
            self.pools.pop(name).fail_waiters(NoWorkers(f"model {name!r} was removed from the config"))
        self._publish_health([*self.pools, *removed])

    async def reload(self) -> str:
        """Re-reads the config file the daemon started with and applies what changed."""
        if self.config.source == EMBEDDED_SOURCE:
            raise ControlError("mpsd runs on the embedded default; start it with --config FILE to reload")
        fresh, demo_refs = prepare_config(load_config(pathlib.Path(self.config.source)), self._data_dir)
        await ensure_demos(demo_refs, self._data_dir, worker_env(fresh.models[0]))
        message = self.fleet.apply_config(fresh)
        self.fleet.probe = make_probe(fresh.memory, working_set_bytes=self._working_set)
        self._sync_pools()
        unchanged = "" if fresh.daemon == self.config.daemon else "; [daemon] changes take effect at the next start"
        self.config = dataclasses.replace(fresh, models=tuple(self.fleet.models.values()))
        return message + unchanged

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        """Only records the request; the main coroutine does the work."""
        if self._stop.is_set():
            log.warning("second %s: stopping now without grace", signal.Signals(signum).name)
            self._force.set()
        else:
            log.info("%s: draining (grace %gs)", signal.Signals(signum).name, self.config.daemon.drain_grace_s)
            self._stop.set()

    async def _drain(self, public: grpc.aio.Server, fleet: Fleet) -> None:
        """New requests get UNAVAILABLE with a sentence while the port stays open; in-flight ones finish.

        grpc's own graceful stop would close the port at once, and clients
        would see CANCELLED or a refused connection instead of a reason.
        """
        self._inference.draining = True
        await self._health.enter_graceful_shutdown()  # before the port closes: health watchers move traffic first
        await asyncio.sleep(0)  # lets each Watch stream write its NOT_SERVING
        log.info("health: NOT_SERVING for every service while draining")
        idle = asyncio.create_task(self._inference.wait_idle())
        force = asyncio.create_task(self._force.wait())
        await asyncio.wait({idle, force}, timeout=self.config.daemon.drain_grace_s, return_when=asyncio.FIRST_COMPLETED)
        drained = idle.done() and not self._force.is_set()
        if not idle.done():
            log.warning("drain grace over with requests still in flight: cancelling them")
        idle.cancel()
        force.cancel()
        # Drained, the only calls left are ones arriving now, each being refused UNAVAILABLE: a moment's grace lets
        # that answer out (stop(0) would end them CANCELLED, which a client's retry policy does not retry).
        await public.stop(REFUSAL_GRACE_S if drained else 0)
        timeout = 0.0 if self._force.is_set() else self.config.daemon.stop_timeout_s
        await fleet.stop_all(timeout)

    def _admin_service(self) -> AdminService:
        """One for the unix socket and the status page, so both report the same daemon uptime."""
        if self._admin is None:
            info = {"listen": self.listen, "state_dir": self.state_dir, "config_path": self.config.source}
            self._admin = AdminService(self.fleet, self.pools, info, self.reload)
        return self._admin

    def _on_transition(self, worker: WorkerRecord, old: WorkerState, new: WorkerState) -> None:
        self.transitions.add(worker.id, worker.process.pid if worker.process else 0, old.value, new.value, worker.reason)
        pool = self.pools.get(worker.model.name)
        if pool is None:
            return  # its model was removed; nothing routes to it any more
        if new == WorkerState.READY:
            self.metrics.time_to_ready.labels(worker.model.name).observe(worker.ready_at - worker.started_at)
            context_length = worker.stats.context_length if worker.stats else 0
            if worker.model.generates:
                worker.process.link.connect()
            pool.add_worker(worker.id, worker.process.link, context_length)
        elif old == WorkerState.READY:
            pool.remove_worker(worker.id)
        elif new not in HOPEFUL_STATES:
            pool.check_prospects()
        self._publish_health([worker.model.name])

    def _publish_health(self, names) -> None:
        """Each named model's grpc.health.v1 status, as a load balancer should read it (serving_status).

        At start the pools are synced before the public server sets its first
        statuses, so _run publishes every model again once it listens. After a
        drain began, the health servicer ignores every set: NOT_SERVING stays.
        """
        loop = asyncio.get_running_loop()
        for name in names:
            pool = self.pools.get(name)
            ready = pool.ready_count if pool else 0
            prospects = self.fleet.demand.prospects(name) if pool else "removed from the config"
            loop.create_task(self._health.set(name, serving_status(ready, prospects)))


def _claim_admin_socket(admin_path: pathlib.Path) -> None:
    """Refuses to start beside a live daemon; removes the socket a dead one left."""
    if not admin_path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(admin_path))
    except OSError:
        admin_path.unlink()
        return
    finally:
        probe.close()
    raise DaemonError(f"another mpsd is running with state directory {admin_path.parent} (its admin socket answers)")
