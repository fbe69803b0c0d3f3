"""The admin service (unix socket only): structured status and operator commands; mpsctl formats.

Handlers run on the daemon's event loop, so commands change the fleet
through its own methods and never from another thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Awaitable, Callable

import grpc

from mpsd import __version__
from mpsd.config import ConfigError
from mpsd.supervisor import admission
from mpsd.supervisor.fleet import ControlError, Fleet, WorkerRecord
from mpsd.supervisor.memory import process_footprint_bytes
from mpsd.supervisor.router import ModelPool
from mpsd.supervisor.states import WorkerState
from mpsd.v1 import admin_pb2, admin_pb2_grpc, worker_pb2

log = logging.getLogger("mpsd.admin")
FRESH_STATS_TIMEOUT_S = 1.0
LOG_FOLLOW_POLL_S = 0.2


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, fleet: Fleet, pools: dict[str, ModelPool], daemon_info: dict,
                 reload: Callable[[], Awaitable[str]]) -> None:
        self._fleet = fleet
        self._pools = pools
        self._daemon_info = daemon_info
        self._reload = reload
        self._started = time.monotonic()

    async def Status(self, request, context):
        await self._refresh_stats()
        return admin_pb2.StatusResponse(
            daemon=admin_pb2.DaemonStatus(
                version=__version__, pid=os.getpid(), uptime_s=time.monotonic() - self._started,
                listen=self._daemon_info.get("listen", ""), state_dir=str(self._daemon_info.get("state_dir", "")),
                config_path=self._daemon_info.get("config_path", ""),
            ),
            models=[self._model_status(m) for m in self._fleet.models.values()],
            memory=self._memory_status(),
            workers=[self._worker_status(w) for w in self._fleet.workers.values()],
        )

    async def WorkerLogs(self, request, context):
        """Polls the worker's stderr ring; a restart switches to the new process with a marker line."""
        worker = self._fleet.workers.get(request.worker_id)
        if worker is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no worker {request.worker_id!r} (workers: {', '.join(self._fleet.workers)})")
        process = worker.process
        seen = 0 if process is None else max(0, process.stderr_count - (request.lines or process.stderr_count))
        while True:
            if process is not None:
                lines, seen = process.stderr_since(seen)
                for line in lines:
                    yield admin_pb2.LogLine(text=line, pid=process.pid)
            if not request.follow:
                return
            await asyncio.sleep(LOG_FOLLOW_POLL_S)
            worker = self._fleet.workers.get(request.worker_id)
            if worker is None:
                return
            if worker.process is not process:
                process, seen = worker.process, 0
                yield admin_pb2.LogLine(text=f"--- {request.worker_id}: new process pid {process.pid} ---", pid=process.pid)

    async def Scale(self, request, context):
        return self._control(lambda: self._fleet.scale(request.model, request.replicas))

    async def RestartWorker(self, request, context):
        return self._control(lambda: self._fleet.restart_worker(request.worker_id))

    async def DrainWorker(self, request, context):
        return self._control(lambda: self._fleet.drain_worker(request.worker_id))

    async def Reload(self, request, context):
        try:
            message = await self._reload()
        except (ControlError, ConfigError) as exc:
            return admin_pb2.ControlResponse(ok=False, message=str(exc))
        log.info("reload: %s", message)
        return admin_pb2.ControlResponse(ok=True, message=message)

    def _control(self, command: Callable[[], str]) -> admin_pb2.ControlResponse:
        try:
            message = command()
        except ControlError as exc:
            return admin_pb2.ControlResponse(ok=False, message=str(exc))
        log.info("operator: %s", message)
        return admin_pb2.ControlResponse(ok=True, message=message)

    async def _refresh_stats(self) -> None:
        """Asks READY workers for their counters now, so status is not a probe period old."""
        ready = [w for w in self._fleet.workers.values() if w.state == WorkerState.READY and w.process.stub]

        async def ask(worker: WorkerRecord) -> None:
            try:
                stats = await worker.process.stub.Stats(worker_pb2.StatsRequest(), timeout=FRESH_STATS_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                return  # the health probe owns judging silence; status shows the last known counters
            if worker.state == WorkerState.READY:
                self._fleet.record_stats(worker, stats)

        await asyncio.gather(*(ask(w) for w in ready))

    def _model_status(self, model) -> admin_pb2.ModelStatus:
        pool = self._pools.get(model.name)
        footprint = self._fleet.footprints[model.name]
        return admin_pb2.ModelStatus(
            name=model.name, backend=model.backend, replicas=model.replicas, ready=pool.ready_count if pool else 0,
            queued=pool.queued if pool else 0, queue_limit=model.queue_limit, concurrency=model.concurrency,
            device=model.device, context_length=pool.context_length if pool else 0,
            footprint_bytes=footprint.bytes, footprint_source=footprint.source,
        )

    def _memory_status(self) -> admin_pb2.MemoryStatus:
        snap, headroom = self._fleet.memory, self._fleet.config.memory.headroom_bytes
        if snap is None:
            failure = f" (failed: {self._fleet.memory_error})" if self._fleet.memory_error else " (not read yet)"
            return admin_pb2.MemoryStatus(probe=self._fleet.probe.name + failure, headroom_bytes=headroom)
        live = self._fleet.live_footprints()
        free = admission.free_bytes(admission.MemoryView(snap.budget_bytes, snap.used_bytes, headroom), live)
        return admin_pb2.MemoryStatus(
            probe=snap.probe, budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes,
            available_bytes=snap.available_bytes, headroom_bytes=headroom, detail=snap.detail,
            free_for_workers_bytes=max(free, 0),
        )

    def _worker_status(self, worker: WorkerRecord) -> admin_pb2.WorkerStatus:
        now = time.monotonic()
        stats = worker.stats
        pid = worker.pid
        pool = self._pools.get(worker.model.name)
        return admin_pb2.WorkerStatus(
            id=worker.id, model=worker.model.name, pid=pid, state=worker.state.value,
            reason="" if worker.state == WorkerState.READY else worker.reason,
            state_age_s=now - worker.state_since, uptime_s=(now - worker.started_at) if pid else 0.0,
            restarts=worker.restarts, inflight=pool.inflight(worker.id) if pool else 0,
            tokens=stats.tokens if stats else 0, requests=stats.requests if stats else 0,
            memory_bytes=process_footprint_bytes(pid),
            backend_memory=dict(stats.backend_memory) if stats else {},
            backend_memory_note=stats.backend_memory_note if stats else "no report yet",
            device=stats.device if stats else "", last_exit=worker.last_exit,
            stderr_tail=worker.stderr_tail, oom_events=stats.oom_events if stats else 0,
        )
