"""`mpsd serve`: wires config, fleet, router, the two gRPC servers, the HTTP API and /metrics, then waits for a signal.

Runs in the foreground (launchd and supervisord need that). SIGTERM or
SIGINT drains: stop taking requests, let in-flight streams finish within
drain_grace, stop the workers, exit 0. A second signal skips the grace.
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
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import mpsd
from mpsd import paths
from mpsd.config import EMBEDDED_SOURCE, Config, ModelConfig, load_config, split_listen
from mpsd.supervisor.access import (
    BearerTokenInterceptor, describe, exposure_problem, is_loopback, read_token, server_credentials, server_ssl_context)
from mpsd.supervisor.admin_api import AdminService
from mpsd.supervisor.demo_build import ensure_demos, resolve_demo_paths
from mpsd.supervisor.fleet import Fleet
from mpsd.supervisor.fleet_commands import ControlError
from mpsd.supervisor.http_server import HttpServer
from mpsd.supervisor.memory import ReportedWorkingSet, make_probe
from mpsd.supervisor.metrics import RequestMetrics, watch_daemon
from mpsd.supervisor.metrics_http import start_metrics_server, url_of
from mpsd.supervisor.openai_http import MAX_BODY_BYTES, OpenAIApi, error_body
from mpsd.supervisor.public_api import InferenceService, add_inference_service
from mpsd.supervisor.router import ModelPool, NoWorkers
from mpsd.supervisor.states import HOPEFUL_STATES, WorkerState
from mpsd.supervisor.status_history import TransitionLines
from mpsd.supervisor.status_page import StatusPage
from mpsd.supervisor.worker_record import WorkerRecord
from mpsd.v1 import admin_pb2, admin_pb2_grpc, inference_pb2

log = logging.getLogger("mpsd")
PACKAGE_PARENT = str(pathlib.Path(mpsd.__file__).resolve().parent.parent)


class DaemonError(RuntimeError):
    """A reason the daemon cannot start, worded for the operator."""


def default_threads(model: ModelConfig, models: tuple[ModelConfig, ...], cpu_count: int) -> int:
    """Splits the cores among all workers, keeping one for the daemon and clients when there are spare.

    Measured here (benchmarks/): one demo worker with 2 torch threads on 2 cores
    streamed 285 tokens/s, with 1 thread 806 — intra-op threads spin against the
    daemon's and the client's per-token work, so oversubscription costs more than
    the second core gives.
    """
    if model.threads:
        return model.threads
    total = sum(m.replicas for m in models) or 1
    spare = cpu_count - 1 if cpu_count > total else cpu_count
    return max(1, spare // total)


def worker_env(model: ModelConfig) -> dict[str, str]:
    """The daemon's environment (PYTHONPATH included), the model's env, and thread caps."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    if model.threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(model.threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars make unreadable log lines
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")
    env.update(model.env)
    return env


def prepare_config(config: Config, data_dir: pathlib.Path) -> tuple[Config, list[str]]:
    """Resolves '@demo'/'@mlx-demo' and per-worker thread counts; returns the demo references used."""
    config, demo_refs = resolve_demo_paths(config, data_dir)
    cpus = os.cpu_count() or 1
    models = tuple(dataclasses.replace(m, threads=default_threads(m, config.models, cpus)) for m in config.models)
    return dataclasses.replace(config, models=models), demo_refs


def serving_status(ready_workers: int, prospects: str | None) -> int:
    """SERVING while a request for the model would be served here: a READY worker, or one that may still come
    (loading, restarting, or demand may start one: Fleet.prospects is None). NOT_SERVING once none will, so that a
    client-side health check or a proxy sends the model's requests to another host."""
    if ready_workers or prospects is None:
        return health_pb2.HealthCheckResponse.SERVING
    return health_pb2.HealthCheckResponse.NOT_SERVING


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
        public = await self._start_public()
        self._publish_health(list(self.pools))
        metrics = None
        try:
            metrics = await self._start_metrics()
            http = await self._start_http()
        except (DaemonError, ValueError):
            if metrics:
                metrics.close()
            await public.stop(0)  # a grpc server left running when the loop closes ends the process with a traceback
            raise
        admin = await self._start_admin(admin_path)
        fleet_task = asyncio.create_task(self.fleet.run())
        log.info("mpsd %s serving %s from %s", mpsd.__version__, ", ".join(self.pools), self.config.source)
        await self._stop.wait()
        await self._drain(public, self.fleet)
        fleet_task.cancel()
        await admin.stop(0)
        if http:
            http.close()  # open through the drain, like the public port: new requests got 503 with a sentence
        if metrics:
            metrics.close()  # served through the drain, so a scrape can watch it
        log.info("mpsd stopped")
        return 0

    def _sync_pools(self) -> None:
        """One pool per configured model; a removed model's queued requests are told so."""
        for name, model in self.fleet.models.items():
            pool = self.pools.get(name)
            if pool is None:
                self.pools[name] = ModelPool(name, model.concurrency, model.queue_limit,
                                             prospects=lambda name=name: self.fleet.prospects(name),
                                             why_waiting=lambda name=name: self.fleet.why_waiting(name))
            else:
                pool.reconfigure(model.concurrency, model.queue_limit)
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
        if not idle.done():
            log.warning("drain grace over with requests still in flight: cancelling them")
        idle.cancel()
        force.cancel()
        await public.stop(0)
        timeout = 0.0 if self._force.is_set() else self.config.daemon.stop_timeout_s
        await fleet.stop_all(timeout)

    async def _start_public(self) -> grpc.aio.Server:
        access = self.config.daemon.access
        problem = exposure_problem(self.listen, access)
        if problem:
            raise DaemonError(problem)
        interceptors = [BearerTokenInterceptor(read_token(access.token_file))] if access.token_file else []
        # Without so_reuseport 0, Linux lets a second daemon bind the same port and the two split the traffic.
        server = grpc.aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        service = self._inference = InferenceService(
            self.pools, lambda name: self.fleet.models[name].generates, self.fleet.explain_loss, self.metrics)
        add_inference_service(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        try:
            if access.tls:
                port = server.add_secure_port(self.listen, server_credentials(access))
            else:
                port = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise DaemonError(f"cannot listen on {self.listen}: {exc} (is another mpsd running? use --listen)") from exc
        host = self.listen.rpartition(":")[0]
        self.listen = f"{host}:{port}"
        await server.start()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in names[:1]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for model in self.config.models:
            await self._health.set(model.name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("public API listening on %s (%s)", self.listen, describe(access))
        return server

    async def _start_metrics(self) -> asyncio.Server | None:
        """Prometheus /metrics on plain HTTP; loopback by default, anywhere the operator says, with a warning.

        The figures carry no secrets and change nothing, but they name models
        and workers and show traffic; a scraper on another machine is the
        usual set-up, so another address is allowed, not refused.
        """
        if not self.metrics_listen:
            return None
        try:
            host, port = split_listen(self.metrics_listen)
        except ValueError as exc:
            raise DaemonError(f"metrics listen: {exc}") from None
        if not is_loopback(host):
            log.warning("metrics on %s are readable by anyone who can reach that address (plain HTTP, no token)",
                        self.metrics_listen)
        page = None
        if is_loopback(host):
            page = StatusPage(self.fleet, self.pools, self.metrics, lambda: self._admin_service().Status(None, None),
                              transitions=self.transitions)
        else:
            log.warning("status page not served on %s: beyond loopback it would need TLS and a token, which the "
                        "metrics listener has not; serve metrics on loopback to see it", self.metrics_listen)
        try:
            server = await start_metrics_server(host, port, self.metrics.registry, page)
        except OSError as exc:
            raise DaemonError(f"cannot serve metrics on {self.metrics_listen}: {exc.strerror or exc} "
                              f"(is another mpsd running? use --metrics-listen, or metrics_listen = \"\" to serve none)") from exc
        log.info("metrics on %s", url_of(server, host))
        if page:
            self._page_task = asyncio.get_running_loop().create_task(page.run())  # samples its history until exit
            log.info("status page on %s", url_of(server, host).removesuffix("metrics"))
        return server

    async def _start_http(self) -> HttpServer | None:
        """The OpenAI-compatible API (openai_http.py) on its own port, under the public port's rules: loopback
        unless TLS and a token are set, and then the same certificate and the same token."""
        if not self.http_listen:
            return None
        access = self.config.daemon.access
        try:
            host, port = split_listen(self.http_listen)
        except ValueError as exc:
            raise DaemonError(f"http listen: {exc}") from None
        if problem := exposure_problem(self.http_listen, access, "http_listen"):
            raise DaemonError(problem)
        api = OpenAIApi(self._inference, self.metrics, read_token(access.token_file) if access.token_file else None)
        server = HttpServer(api.handle, error_body, MAX_BODY_BYTES)
        try:
            port = await server.start(host, port, server_ssl_context(access) if access.tls else None)
        except OSError as exc:
            raise DaemonError(f"cannot serve the HTTP API on {self.http_listen}: {exc.strerror or exc} (is another "
                              f"mpsd running? use --http-listen, or http_listen = \"\" to serve none)") from exc
        scheme = "https" if access.tls else "http"
        log.info("OpenAI-compatible HTTP API listening on %s://%s:%d/v1 (%s)", scheme, host, port, describe(access))
        return server

    async def _start_admin(self, admin_path: pathlib.Path) -> grpc.aio.Server:
        server = grpc.aio.server()
        admin_pb2_grpc.add_AdminServicer_to_server(self._admin_service(), server)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            server.add_insecure_port(f"unix:{admin_path}")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(admin_path, 0o600)
        log.info("admin API on %s (mode 0600)", admin_path)
        return server

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
            pool.add_worker(worker.id, worker.process.stub, context_length)
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
            prospects = self.fleet.prospects(name) if pool else "removed from the config"
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
