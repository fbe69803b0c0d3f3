"""The admin service (unix socket only): structured status; mpsctl formats it."""

from __future__ import annotations

import asyncio
import logging
import os
import time

import grpc

from mpsd import __version__
from mpsd.config import Config
from mpsd.supervisor.fleet import Fleet, WorkerRecord
from mpsd.supervisor.memory import apply_overrides, process_footprint_bytes
from mpsd.supervisor.router import ModelPool
from mpsd.supervisor.states import WorkerState
from mpsd.v1 import admin_pb2, admin_pb2_grpc, worker_pb2

log = logging.getLogger("mpsd.admin")
FRESH_STATS_TIMEOUT_S = 1.0


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, config: Config, fleet: Fleet, pools: dict[str, ModelPool], probe, daemon_info: dict) -> None:
        self._config = config
        self._fleet = fleet
        self._pools = pools
        self._probe = probe
        self._daemon_info = daemon_info
        self._started = time.monotonic()

    async def Status(self, request, context):
        await self._refresh_stats()
        return admin_pb2.StatusResponse(
            daemon=admin_pb2.DaemonStatus(
                version=__version__, pid=os.getpid(), uptime_s=time.monotonic() - self._started,
                listen=self._daemon_info.get("listen", ""), state_dir=str(self._daemon_info.get("state_dir", "")),
                config_path=self._config.source,
            ),
            models=[self._model_status(m) for m in self._config.models],
            memory=self._memory_status(),
            workers=[self._worker_status(w) for w in self._fleet.workers.values()],
        )

    async def _refresh_stats(self) -> None:
        """Asks READY workers for their counters now, so status is not a probe period old."""
        ready = [w for w in self._fleet.workers.values() if w.state == WorkerState.READY and w.process.stub]

        async def ask(worker: WorkerRecord) -> None:
            try:
                worker.stats = await worker.process.stub.Stats(worker_pb2.StatsRequest(), timeout=FRESH_STATS_TIMEOUT_S)
            except grpc.aio.AioRpcError:
                pass  # the health probe owns judging silence; status shows the last known counters

        await asyncio.gather(*(ask(w) for w in ready))

    def _model_status(self, model) -> admin_pb2.ModelStatus:
        pool = self._pools[model.name]
        return admin_pb2.ModelStatus(
            name=model.name, backend=model.backend, replicas=model.replicas, ready=pool.ready_count,
            queued=pool.queued, queue_limit=model.queue_limit, concurrency=model.concurrency,
            device=model.device, context_length=pool.context_length,
        )

    def _memory_status(self) -> admin_pb2.MemoryStatus:
        try:
            snap = apply_overrides(self._probe.snapshot(), self._config.memory)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("memory probe failed: %s", exc)
            return admin_pb2.MemoryStatus(probe=f"{self._probe.name} (failed: {exc})")
        return admin_pb2.MemoryStatus(
            probe=snap.probe, budget_bytes=snap.budget_bytes, used_bytes=snap.used_bytes,
            available_bytes=snap.available_bytes,
        )

    def _worker_status(self, worker: WorkerRecord) -> admin_pb2.WorkerStatus:
        now = time.monotonic()
        stats = worker.stats
        pid = worker.pid
        return admin_pb2.WorkerStatus(
            id=worker.id, model=worker.model.name, pid=pid, state=worker.state.value, reason=worker.reason,
            state_age_s=now - worker.state_since, uptime_s=(now - worker.started_at) if pid else 0.0,
            restarts=worker.restarts, inflight=self._pools[worker.model.name].inflight(worker.id),
            tokens=stats.tokens if stats else 0, requests=stats.requests if stats else 0,
            memory_bytes=process_footprint_bytes(pid),
            backend_memory=dict(stats.backend_memory) if stats else {},
            backend_memory_note=stats.backend_memory_note if stats else "no report yet",
            device=stats.device if stats else "", last_exit=worker.last_exit,
        )
