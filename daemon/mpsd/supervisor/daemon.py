"""`mpsd serve`: wires config, fleet, router and the two gRPC servers, then waits for a signal.

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
from mpsd.config import Config, ModelConfig
from mpsd.supervisor.admin_api import AdminService
from mpsd.supervisor.demo_build import ensure_demo_model, resolve_demo_paths
from mpsd.supervisor.fleet import Fleet, WorkerRecord
from mpsd.supervisor.memory import make_probe
from mpsd.supervisor.public_api import InferenceService
from mpsd.supervisor.router import ModelPool
from mpsd.supervisor.states import HOPEFUL_STATES, WorkerState
from mpsd.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger("mpsd")
PACKAGE_PARENT = str(pathlib.Path(mpsd.__file__).resolve().parent.parent)


class DaemonError(RuntimeError):
    """A reason the daemon cannot start, worded for the operator."""


def default_threads(model: ModelConfig, models: tuple[ModelConfig, ...], cpu_count: int) -> int:
    """Splits the cores among all workers so CPU workers do not oversubscribe them."""
    if model.threads:
        return model.threads
    total = sum(m.replicas for m in models) or 1
    return max(1, cpu_count // total)


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


class Daemon:
    def __init__(self, config: Config, state_dir: pathlib.Path, listen: str, data_dir: pathlib.Path) -> None:
        config, self._demo_dir = resolve_demo_paths(config, data_dir)
        cpus = os.cpu_count() or 1
        models = tuple(dataclasses.replace(m, threads=default_threads(m, config.models, cpus)) for m in config.models)
        self.config = dataclasses.replace(config, models=models)
        self.state_dir = state_dir
        self.listen = listen
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._health = health.aio.HealthServicer()

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
        if self._demo_dir:
            await ensure_demo_model(self._demo_dir, worker_env(self.config.models[0]))
        pools: dict[str, ModelPool] = {}
        fleet = Fleet(self.config, run_dir, worker_env, lambda w, old, new: self._on_transition(pools, fleet, w, old, new))
        for model in self.config.models:
            pools[model.name] = ModelPool(
                model.name, model.concurrency, model.queue_limit,
                has_prospects=lambda name=model.name: any(w.state in HOPEFUL_STATES for w in fleet.workers_of(name)),
            )
        public = await self._start_public(pools)
        admin = await self._start_admin(admin_path, fleet, pools)
        fleet_task = asyncio.create_task(fleet.run())
        log.info("mpsd %s serving %s from %s", mpsd.__version__, ", ".join(pools), self.config.source)
        await self._stop.wait()
        await self._drain(public, fleet)
        fleet_task.cancel()
        await admin.stop(0)
        log.info("mpsd stopped")
        return 0

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
        await self._health.enter_graceful_shutdown()
        stop = asyncio.create_task(public.stop(self.config.daemon.drain_grace_s))
        force = asyncio.create_task(self._force.wait())
        await asyncio.wait({stop, force}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.done():
            await public.stop(0)
        force.cancel()
        timeout = 0.0 if self._force.is_set() else self.config.daemon.stop_timeout_s
        await fleet.stop_all(timeout)

    async def _start_public(self, pools: dict[str, ModelPool]) -> grpc.aio.Server:
        # Without this, Linux lets a second daemon bind the same port and the two split the traffic.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        generative = {m.name for m in self.config.models if m.generates}
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(pools, generative), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        try:
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
        log.info("public API listening on %s", self.listen)
        return server

    async def _start_admin(self, admin_path: pathlib.Path, fleet: Fleet, pools: dict[str, ModelPool]) -> grpc.aio.Server:
        server = grpc.aio.server()
        info = {"listen": self.listen, "state_dir": self.state_dir}
        admin_pb2_grpc.add_AdminServicer_to_server(AdminService(self.config, fleet, pools, make_probe(self.config.memory), info), server)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            server.add_insecure_port(f"unix:{admin_path}")
            await server.start()
        finally:
            os.umask(old_umask)
        os.chmod(admin_path, 0o600)
        log.info("admin API on %s (mode 0600)", admin_path)
        return server

    def _on_transition(self, pools: dict[str, ModelPool], fleet: Fleet, worker: WorkerRecord, old: WorkerState, new: WorkerState) -> None:
        pool = pools[worker.model.name]
        if new == WorkerState.READY:
            context_length = worker.stats.context_length if worker.stats else 0
            pool.add_worker(worker.id, worker.process.stub, context_length)
        elif old == WorkerState.READY:
            pool.remove_worker(worker.id)
        elif new not in HOPEFUL_STATES:
            pool.check_prospects()
        status = health_pb2.HealthCheckResponse.SERVING if pool.ready_count else health_pb2.HealthCheckResponse.NOT_SERVING
        asyncio.get_running_loop().create_task(self._health.set(worker.model.name, status))


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
