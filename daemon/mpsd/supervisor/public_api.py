"""The public mpsd.v1.Inference service: validate, route, forward.

Errors are gRPC status codes with a sentence: INVALID_ARGUMENT for bad
input, NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED for a full queue,
UNAVAILABLE when no worker can serve, DEADLINE_EXCEEDED while queued.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

import grpc

from mpsd.generate_params import InvalidRequest, check_against_model, parse_generate_request
from mpsd.supervisor.router import Lease, ModelPool, NoWorkers, QueueFull, Slot
from mpsd.v1 import inference_pb2_grpc

log = logging.getLogger("mpsd.api")
# Worker answers passed to the client as they are: they describe the request.
PASS_THROUGH_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
})


class WorkerLost(Exception):
    """The worker went away during the request."""


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, pools: dict[str, ModelPool], generates: Callable[[str], bool]) -> None:
        self._pools = pools
        self._generates = generates
        self.draining = False

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        pool = await self._pool_for(request.model, context, generate=True)
        try:
            params = parse_generate_request(request)
            check_against_model(params, pool.context_length)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        tried: frozenset[Slot] = frozenset()
        while True:
            lease = await self._acquire(pool, context, tried)
            sent_any = False
            try:
                async for message in self._forward_stream(lease, request, context):
                    sent_any = True
                    yield message
                return
            except WorkerLost as exc:
                if sent_any or tried:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                log.warning("%s; retrying once on another worker", exc)
                tried = frozenset({lease.slot})
            finally:
                pool.release(lease)

    async def Predict(self, request, context: grpc.aio.ServicerContext):
        pool = await self._pool_for(request.model, context, generate=False)
        lease = await self._acquire(pool, context, frozenset())
        try:
            return await lease.stub.Predict(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await self._abort_for_worker_error(context, lease, exc)
        finally:
            pool.release(lease)

    async def _forward_stream(self, lease: Lease, request, context):
        call = lease.stub.Generate(request, timeout=context.time_remaining())
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            if exc.code() in PASS_THROUGH_CODES:
                await context.abort(exc.code(), exc.details())
            raise WorkerLost(f"worker {lease.worker_id} went away mid-stream ({exc.code().name}: {exc.details()})") from None
        finally:
            call.cancel()  # the client left or the stream ended: stop the worker's generation

    async def _pool_for(self, name: str, context, *, generate: bool) -> ModelPool:
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "mpsd is draining for shutdown: not accepting new requests")
        known = ", ".join(sorted(self._pools)) or "none"
        if not name and len(self._pools) == 1:
            name = next(iter(self._pools))
        elif not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model: required when several models are configured ({known})")
        pool = self._pools.get(name)
        if pool is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: no model named {name!r} (configured: {known})")
        if generate != self._generates(name):
            verb = "Generate" if generate else "Predict"
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model: {name!r} does not serve {verb}")
        return pool

    async def _acquire(self, pool: ModelPool, context, tried: frozenset[Slot]) -> Lease:
        try:
            return await pool.acquire(context.time_remaining(), exclude=tried)
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except NoWorkers as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {pool.name!r}: deadline passed while queued for a worker")

    async def _abort_for_worker_error(self, context, lease: Lease, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in PASS_THROUGH_CODES:
            await context.abort(exc.code(), exc.details())
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker {lease.worker_id} failed: {exc.code().name}: {exc.details()}")
