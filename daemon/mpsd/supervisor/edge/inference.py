"""The public mpsd.v1.Inference service: validate, route, forward.

Errors are gRPC status codes with a sentence: INVALID_ARGUMENT for bad
input, NOT_FOUND for an unknown model, RESOURCE_EXHAUSTED for a full queue,
UNAVAILABLE when no worker can serve, DEADLINE_EXCEEDED while queued. Every
call that reaches the service is counted in RequestMetrics with the status it
ended with; Generate and Chat also time each token they forward.

Generate and Chat share one path (Chat differs only in how the request is
checked and which worker method renders it), and so does the OpenAI-compatible
HTTP API (http/openai.py), which calls `stream` with a context of its own: the
service uses only abort(), time_remaining() and code() of a call's context.

Each is routed by its text (ROUTING_KEYS: a Generate's prompt, a Chat's
canonical messages), so a pool that follows prefixes sends it to the worker
likely to hold the longest prefix of it; once the worker's stream finishes,
the pool records that the worker holds the text with its answer (ANSWER_SUFFIXES).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Iterator

import grpc
from google.protobuf.message import DecodeError

from mpsd.chat_params import parse_chat_request
from mpsd.config.schema import DaemonConfig
from mpsd.generate_params import InvalidRequest, check_against_model, parse_generate_request
from mpsd.supervisor.edge.metrics import UNKNOWN_MODEL, RequestMetrics, RequestTimer
from mpsd.supervisor.fleet.worker_link import StreamDeadline, StreamLost, WorkerAnswered
from mpsd.supervisor.routing.pool import Lease, ModelPool, NoWorkers, QueueFull, Slot
from mpsd.supervisor.routing.prefix_policy import chat_answer_suffix, chat_routing_key
from mpsd.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("mpsd.api")
# Worker answers passed to the client as they are: they describe the request.
# UNKNOWN (the model raised) becomes INTERNAL; any other code means the worker went away.
PASS_THROUGH_CODES = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.DEADLINE_EXCEEDED,
})


# How long a broken stream waits to learn why its worker died (the exit is reaped just after).
LOSS_EXPLAIN_WAIT_S = 2.0
# (worker id, the worker process's link, seconds to wait) -> how that process ended, or "".
ExplainLoss = Callable[[str, object, float], Awaitable[str]]


# How each streaming method reads its request into the sampling parameters the daemon checks before routing.
PARSE_STREAMING = {
    "Generate": parse_generate_request,
    "Chat": lambda request: parse_chat_request(request).sampling,
}
# The text each streaming method is routed by, and what its answer adds to it in the worker's cache.
ROUTING_KEYS: dict[str, Callable[[object], str]] = {
    "Generate": lambda request: request.prompt,
    "Chat": lambda request: chat_routing_key(request.messages, request.tools_json),
}
ANSWER_SUFFIXES: dict[str, Callable[[str], str]] = {
    "Generate": lambda answer: answer,
    "Chat": chat_answer_suffix,
}


class WorkerLost(Exception):
    """The worker went away during the request."""


async def _unexplained(worker_id: str, link: object, wait_s: float) -> str:
    return ""


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, pools: dict[str, ModelPool], generates: Callable[[str], bool],
                 explain_loss: ExplainLoss = _unexplained, metrics: RequestMetrics | None = None,
                 stream_buffer: int = DaemonConfig.stream_buffer) -> None:
        self._pools = pools
        self._stream_buffer = stream_buffer
        self._generates = generates
        self._explain_loss = explain_loss
        self._metrics = metrics or RequestMetrics()
        self.draining = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no request is in flight or queued: what a drain waits for."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _call(self, request, context: grpc.aio.ServicerContext, method: str,
              protocol: str = "grpc") -> Iterator[RequestTimer]:
        """Counts the call as active (what a drain waits for) and records how it ended."""
        self._active += 1
        self._idle.clear()
        timer = self._metrics.start(self._model_label(request), method, protocol)
        code = grpc.StatusCode.OK
        try:
            yield timer
        except BaseException as exc:
            code = _ended_with(exc, context)
            raise
        finally:
            timer.finish(code)
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def Generate(self, request, context: grpc.aio.ServicerContext):
        return self.stream(request, context, "Generate")  # the stream itself: no generator layer per token

    def Chat(self, request, context: grpc.aio.ServicerContext):
        return self.stream(request, context, "Chat")

    async def stream(self, request, context, method: str, protocol: str = "grpc"):
        """Generate or Chat (`method`) for any front end: check, route, forward; counted under method and protocol."""
        with self._call(request, context, method, protocol) as timer:
            async for message in self._generate(request, context, method):
                if not message.HasField("finish"):
                    timer.token()
                yield message

    @property
    def models(self) -> list[str]:
        return sorted(self._pools)

    def generates(self, name: str) -> bool:
        return self._generates(name)

    async def _generate(self, request, context: grpc.aio.ServicerContext, method: str):
        pool = await self._pool_for(request, context, verb=method)
        try:
            check_against_model(PARSE_STREAMING[method](request), pool.context_length)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        tried: frozenset[Slot] = frozenset()
        key = ROUTING_KEYS[method](request) if pool.follows_prefix else None
        while True:
            lease = await self._acquire(pool, context, tried, key)
            sent_any = False
            answer: list[str] = []
            try:
                async for message in self._forward_stream(lease, request, context, method):
                    sent_any = True
                    if key is not None and not message.HasField("finish"):
                        answer.append(message.text)
                    elif key is not None:  # recorded before the client may leave: the worker holds it either way
                        pool.record(lease, key + ANSWER_SUFFIXES[method]("".join(answer)))
                    yield message
                return
            except WorkerLost as exc:
                if sent_any or tried:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, await self._why(exc, lease))
                log.warning("%s; retrying once on another worker", exc)
                tried = frozenset({lease.slot})
            finally:
                pool.release(lease)

    async def Predict(self, request, context: grpc.aio.ServicerContext):
        with self._call(request, context, "Predict"):
            return await self._predict(request, context)

    async def _predict(self, request, context: grpc.aio.ServicerContext):
        pool = await self._pool_for(request, context, verb="Predict")
        lease = await self._acquire(pool, context, frozenset(), None)
        try:
            return await lease.link.stub.Predict(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await self._abort_for_worker_error(context, lease, exc)
        finally:
            pool.release(lease)

    async def _why(self, exc: WorkerLost, lease: Lease) -> str:
        """The loss, with the worker's exit when it died (OOM, crash, killed as hung)."""
        exit_description = await self._explain_loss(lease.worker_id, lease.link, LOSS_EXPLAIN_WAIT_S)
        return f"{exc}; the worker exited: {exit_description}" if exit_description else str(exc)

    async def _forward_stream(self, lease: Lease, request, context, method: str):
        """The worker's answer, from its one Steps stream (fleet/worker_link.py): the hop's unit is a step."""
        stream = lease.link.open(method, request, context.time_remaining(), self._stream_buffer)
        try:
            async for message in stream:
                yield message
        except WorkerAnswered as exc:
            await self._abort_if_worker_answered(context, lease, exc.code, exc.details)
            raise WorkerLost(f"worker {lease.worker_id} ended the request ({exc})") from None
        except StreamLost as exc:
            raise WorkerLost(f"worker {lease.worker_id} went away mid-stream ({exc})") from None
        except StreamDeadline as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        finally:
            stream.close()  # the client left or the stream ended: the worker stops generating for it

    def _model_name(self, request) -> str:
        """The model a request means: the one it names, or the only one configured when it names none."""
        name = "" if isinstance(request, Undecodable) else request.model
        return next(iter(self._pools)) if not name and len(self._pools) == 1 else name

    def _model_label(self, request) -> str:
        name = self._model_name(request)
        return name if name in self._pools else UNKNOWN_MODEL

    async def _pool_for(self, request, context, *, verb: str) -> ModelPool:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.sentence)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "mpsd is draining for shutdown: not accepting new requests")
        known = ", ".join(sorted(self._pools)) or "none"
        name = self._model_name(request)
        if not name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model: required when several models are configured ({known})")
        pool = self._pools.get(name)
        if pool is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"model: no model named {name!r} (configured: {known})")
        if (verb != "Predict") != self._generates(name):
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model: {name!r} does not serve {verb}")
        return pool

    async def _acquire(self, pool: ModelPool, context, tried: frozenset[Slot], key: str | None) -> Lease:
        loading = not pool.ready_count  # served only once a worker loads (on demand, or after a restart)
        try:
            lease = await pool.acquire(context.time_remaining(), exclude=tried, routing_key=key)
            if loading:
                self._metrics.waited_for_load.labels(pool.name).inc()
            return lease
        except QueueFull as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except NoWorkers as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except asyncio.TimeoutError:
            if why := pool.why_waiting():  # its load was refused for memory: say what holds it
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"model {pool.name!r}: deadline passed waiting for memory: {why}")
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"model {pool.name!r}: deadline passed while queued for a worker")

    async def _abort_if_worker_answered(self, context, lease: Lease, code: grpc.StatusCode, details: str) -> None:
        """A live worker's own answer ends the call; only a vanished worker (any other code) is a loss."""
        if code in PASS_THROUGH_CODES:
            await context.abort(code, details)
        if code == grpc.StatusCode.UNKNOWN:  # the model raised: another worker would raise too
            await context.abort(grpc.StatusCode.INTERNAL, f"worker {lease.worker_id} failed: {details}")

    async def _abort_for_worker_error(self, context, lease: Lease, exc: grpc.aio.AioRpcError) -> None:
        await self._abort_if_worker_answered(context, lease, exc.code(), exc.details())
        lost = WorkerLost(f"worker {lease.worker_id} failed: {exc.code().name}: {exc.details()}")
        await context.abort(grpc.StatusCode.UNAVAILABLE, await self._why(lost, lease))


def _ended_with(exc: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """The status a call that raised ends with: what it aborted with, else why grpc stopped it, else UNKNOWN."""
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        remaining = context.time_remaining()
        return grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
    return context.code() or grpc.StatusCode.UNKNOWN


def add_inference_service(service: InferenceService, server: grpc.aio.Server) -> None:
    """Registers `service` as the generated add_InferenceServicer_to_server does, but decodes requests tolerantly.

    grpc parses a request before any servicer code runs. A message that does
    not parse (a string field holding invalid UTF-8, a corrupt wire format)
    raised inside grpc: the client got UNKNOWN and the daemon log a traceback.
    Here such a request reaches the service as Undecodable, is answered
    INVALID_ARGUMENT with what protobuf said, and is counted like any other.
    """
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            _closing(service.Generate),
            request_deserializer=_tolerant(inference_pb2.GenerateRequest),
            response_serializer=inference_pb2.GenerateResponse.SerializeToString,
        ),
        "Chat": grpc.unary_stream_rpc_method_handler(
            _closing(service.Chat),
            request_deserializer=_tolerant(inference_pb2.ChatRequest),
            response_serializer=inference_pb2.GenerateResponse.SerializeToString,
        ),
        "Predict": grpc.unary_unary_rpc_method_handler(
            service.Predict,
            request_deserializer=_tolerant(inference_pb2.PredictRequest),
            response_serializer=inference_pb2.PredictResponse.SerializeToString,
        ),
    }
    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class Undecodable:
    """A request that protobuf could not parse, with the sentence the client gets."""

    def __init__(self, sentence: str) -> None:
        self.sentence = sentence


def _tolerant(message_class) -> Callable[[bytes], object]:
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return Undecodable(f"request: not a valid {message_class.DESCRIPTOR.full_name} ({exc})")
    return deserialize


def _closing(method):
    async def handler(request, context: grpc.aio.ServicerContext):
        # Closing this generator closes the service's at once: its finally blocks release the worker slot.
        async with contextlib.aclosing(method(request, context)) as messages:
            async for message in messages:
                yield message
    return handler
