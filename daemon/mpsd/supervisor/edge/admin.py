"""The admin service (unix socket only): structured status and operator commands; mpsctl formats.

Handlers run on the daemon's event loop, so commands change the fleet
through its own methods and never from another thread. Status renders the
fleet's snapshot, the same one metrics renders.
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
from mpsd.supervisor.fleet.commands import ControlError
from mpsd.supervisor.fleet.fleet import Fleet
from mpsd.supervisor.fleet.snapshot import DeviceReading, MemoryReading, ModelView, WorkerView
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.process_memory import ProcessMemory
from mpsd.supervisor.routing.pool import ModelPool
from mpsd.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger("mpsd.admin")
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
        await self._fleet.health.refresh_stats()
        snapshot = self._fleet.snapshot()
        return admin_pb2.StatusResponse(
            daemon=admin_pb2.DaemonStatus(
                version=__version__, pid=os.getpid(), uptime_s=time.monotonic() - self._started,
                listen=self._daemon_info.get("listen", ""), state_dir=str(self._daemon_info.get("state_dir", "")),
                config_path=self._daemon_info.get("config_path", ""),
            ),
            models=[self._model_status(m) for m in snapshot.models if m.config is not None],
            memory=_memory_status(snapshot.memory),
            workers=[self._worker_status(w) for w in snapshot.workers],
        )

    async def WorkerLogs(self, request, context):
        """Polls the worker's stderr ring; a restart switches to the new process with a marker line."""
        try:
            process = self._fleet.commands.log_source(request.worker_id)
        except ControlError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        seen = 0 if process is None else max(0, process.stderr_count - (request.lines or process.stderr_count))
        while True:
            if process is not None:
                lines, seen = process.stderr_since(seen)
                for line in lines:
                    yield admin_pb2.LogLine(text=line, pid=process.pid)
            if not request.follow:
                return
            await asyncio.sleep(LOG_FOLLOW_POLL_S)
            try:
                current = self._fleet.commands.log_source(request.worker_id)
            except ControlError:
                return  # removed by scale-down or reload
            if current is not None and current is not process and current.pid:  # once started: the marker names its pid
                process, seen = current, 0
                yield admin_pb2.LogLine(text=f"--- {request.worker_id}: new process pid {process.pid} ---", pid=process.pid)

    async def Scale(self, request, context):
        bounds = {key: getattr(request, key) for key in ("min_replicas", "max_replicas") if request.HasField(key)}
        return self._control(lambda: self._fleet.commands.scale(request.model, request.replicas, **bounds))

    async def RestartWorker(self, request, context):
        return self._control(lambda: self._fleet.commands.restart_worker(request.worker_id))

    async def DrainWorker(self, request, context):
        return self._control(lambda: self._fleet.commands.drain_worker(request.worker_id))

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

    def _model_status(self, view: ModelView) -> admin_pb2.ModelStatus:
        model, pool = view.config, self._pools.get(view.name)
        return admin_pb2.ModelStatus(
            name=model.name, backend=model.backend, replicas=model.replicas, ready=pool.ready_count if pool else 0,
            queued=pool.queued if pool else 0, queue_limit=model.queue_limit, concurrency=model.concurrency,
            device=model.device, context_length=pool.context_length if pool else 0,
            footprint_bytes=view.footprint_bytes, footprint_source=view.footprint_source,
            min_replicas=model.min_replicas, max_replicas=model.max_replicas, priority=model.priority,
            live=view.live, desired=view.desired, last_change=view.last_change,
            shared_bytes=view.shared_bytes, shared_by=view.shared_by,
        )

    def _worker_status(self, worker: WorkerView) -> admin_pb2.WorkerStatus:
        stats = worker.stats
        pool = self._pools.get(worker.model)
        return admin_pb2.WorkerStatus(
            id=worker.id, model=worker.model, pid=worker.pid, state=worker.state.value,
            reason="" if worker.state == WorkerState.READY else worker.reason,
            state_age_s=worker.state_age_s, uptime_s=worker.uptime_s,
            restarts=worker.restarts, inflight=pool.inflight(worker.id) if pool else 0,
            tokens=stats.tokens if stats else 0, requests=stats.requests if stats else 0,
            memory_bytes=worker.memory_bytes,
            backend_memory=dict(stats.backend_memory) if stats else {},
            backend_memory_note=stats.backend_memory_note if stats else "no report yet",
            device=stats.device if stats else "", last_exit=worker.last_exit,
            stderr_tail=worker.stderr_tail, oom_events=stats.oom_events if stats else 0,
            running_sequences=stats.running_sequences if stats else 0, kv_bytes=stats.kv_bytes if stats else 0,
            prefix_cache=stats.prefix_cache if stats else None,
            prefix_cache_note=worker.prefix_cache_note, process_memory=_process_memory(worker.process_memory),
            step_messages=stats.step_messages if stats else 0,
            placed_device=worker.device, visible_devices=stats.visible_devices if stats else "",
            predict_passes=stats.predict_passes if stats else 0,
        )


def _process_memory(memory: ProcessMemory) -> admin_pb2.ProcessMemory:
    return admin_pb2.ProcessMemory(
        footprint_bytes=memory.footprint, rss_bytes=memory.rss, uss_bytes=memory.uss, pss_bytes=memory.pss,
        clean_bytes=memory.clean_bytes, processes=memory.processes)


def _memory_status(memory: MemoryReading) -> admin_pb2.MemoryStatus:
    snap = memory.snapshot
    if snap is None:
        return admin_pb2.MemoryStatus(probe=f"{memory.probe} (failed: {memory.error})", headroom_bytes=memory.headroom_bytes)
    return admin_pb2.MemoryStatus(
        probe=snap.probe, budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes,
        available_bytes=snap.available_bytes, headroom_bytes=memory.headroom_bytes, detail=snap.detail,
        free_for_workers_bytes=memory.free_for_workers_bytes, devices=[_device_memory(d) for d in memory.devices],
    )


def _device_memory(device: DeviceReading) -> admin_pb2.DeviceMemory:
    snap = device.snapshot
    return admin_pb2.DeviceMemory(
        device=snap.device, budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes,
        available_bytes=snap.available_bytes, headroom_bytes=device.headroom_bytes,
        free_for_workers_bytes=device.free_for_workers_bytes, detail=snap.detail, workers=device.workers,
        utilization_percent=snap.utilization_percent, temperature_c=snap.temperature_c)
