"""The OpenAI-compatible HTTP API: answers whole or as Server-Sent Events.

Reached through the edge's route table (routes.py, which also checks the
token), on the daemon's event loop (server.py), and answered by the same
InferenceService as gRPC, through its `stream` with protocol "http": the same
model lookup, checks, router, queue, batching, retry and metrics, and no second
hop. The service speaks to a call through a context; here that context turns
its aborts into Refusals, which become OpenAI errors (openai_schema.error_for),
and gives it the deadline an `X-Request-Timeout: SECONDS` header asks for.

Headers of a streamed answer wait for the first token, so a refusal before it
(unknown model, full queue, bad input) still gets its own HTTP status; one
after it arrives as an error event, which the SDKs raise.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, AsyncIterator, Callable

import grpc

from mpsd.supervisor.edge.http.openai_schema import (
    SSE_DONE,
    Answer,
    BadField,
    Completion,
    decode_body,
    error,
    error_for,
    model_entry,
    models_list,
    parse_chat,
    parse_completion,
    sse,
    to_json,
)
from mpsd.supervisor.edge.http.server import Exchange, HttpRequest
from mpsd.supervisor.edge.inference import InferenceService
from mpsd.supervisor.edge.metrics import UNKNOWN_MODEL, RequestMetrics

TIMEOUT_HEADER = "x-request-timeout"
COMPLETIONS: dict[str, Callable[[dict[str, Any]], Completion]] = {
    "/v1/chat/completions": parse_chat,
    "/v1/completions": parse_completion,
}


class Refusal(Exception):
    """The service aborted the call with this gRPC status and sentence."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class HttpCallContext:
    """What InferenceService uses of a grpc.aio.ServicerContext, for one HTTP request."""

    def __init__(self, timeout_s: float | None) -> None:
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._code: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._code = code
        raise Refusal(code, details)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def code(self) -> grpc.StatusCode | None:
        return self._code


class OpenAIApi:
    """The answers of /v1: `models`, `model` (/v1/models/NAME) and `complete` (both completion paths)."""

    def __init__(self, service: InferenceService, metrics: RequestMetrics) -> None:
        self._service, self._metrics = service, metrics
        self._created = int(time.time())  # a model's "created": when this daemon started serving it

    async def models(self, request: HttpRequest, exchange: Exchange) -> None:
        await send_json(exchange, 200, models_list(self._generating(), self._created))

    async def model(self, request: HttpRequest, exchange: Exchange) -> None:
        name = request.path.rpartition("/")[2]
        if name not in self._generating():
            return await send_json(exchange, 404, error(404, f"model: no model named {name!r} (configured: "
                                                             f"{', '.join(self._generating()) or 'none'})",
                                                        "model", code="model_not_found"))
        await send_json(exchange, 200, model_entry(name, self._created))

    async def complete(self, request: HttpRequest, exchange: Exchange) -> None:
        parse, body = COMPLETIONS[request.path], None
        try:
            body = decode_body(request.body)
            completion = parse(body)
            timeout_s = _timeout(request.headers.get(TIMEOUT_HEADER))
        except BadField as exc:  # counted like a gRPC request that does not parse
            method = "Chat" if parse is parse_chat else "Generate"
            self._metrics.start(self._label(body), method, "http").finish(grpc.StatusCode.INVALID_ARGUMENT)
            return await send_json(exchange, 400, error(400, str(exc), exc.param))
        answer = Answer(chat=completion.method == "Chat", model=self._model_name(completion.request.model),
                        created=int(time.time()))
        messages = self._service.stream(completion.request, HttpCallContext(timeout_s), completion.method, "http")
        async with contextlib.aclosing(messages):  # however this ends (a client gone too), the worker stops
            if completion.stream:
                await _stream(exchange, messages, answer, completion.include_usage)
            else:
                await _whole(exchange, messages, answer)

    def _generating(self) -> list[str]:
        return [name for name in self._service.models if self._service.generates(name)]

    def _label(self, body: dict[str, Any] | None) -> str:
        """The model label of a request refused before the service saw it: never a name a client made up."""
        requested = body.get("model") if body else None
        name = self._model_name(requested if isinstance(requested, str) else "")
        return name if name in self._service.models else UNKNOWN_MODEL

    def _model_name(self, requested: str) -> str:
        """The model an answer names: the one asked for, or the only one configured when none was."""
        models = self._service.models
        return requested or (models[0] if len(models) == 1 else "")


async def _whole(exchange: Exchange, messages: AsyncIterator, answer: Answer) -> None:
    texts, finish = [], None
    try:
        async for message in messages:
            if message.HasField("finish"):
                finish = message.finish
            else:
                texts.append(message.text)
    except Refusal as exc:
        return await send_json(exchange, *error_for(exc.code, exc.details))
    if finish is None:
        return await send_json(exchange, 500, error(500, "the worker's stream ended without its last message"))
    await send_json(exchange, 200, answer.whole("".join(texts), finish))


async def _stream(exchange: Exchange, messages: AsyncIterator, answer: Answer, include_usage: bool) -> None:
    try:
        message = await anext(messages, None)
    except Refusal as exc:
        return await send_json(exchange, *error_for(exc.code, exc.details))
    await exchange.start(200, "text/event-stream", (("cache-control", "no-cache"),))
    if answer.chat:
        await exchange.write(sse(answer.chunk(first=True)))
    try:
        while message is not None:
            if message.HasField("finish"):
                await exchange.write(sse(answer.chunk(finish_reason=message.finish.reason, finish=message.finish)))
                if include_usage:
                    await exchange.write(sse(answer.usage_chunk(message.finish)))
            elif message.HasField("tool_call"):
                await exchange.write(sse(answer.chunk(tool_call=message.tool_call)))
            elif message.text:  # "" while a character or a possible stop sequence is incomplete
                await exchange.write(sse(answer.chunk(message.text)))
            message = await anext(messages, None)
    except Refusal as exc:  # after the first token: the status is sent, so the error goes in the stream
        await exchange.write(sse(error_for(exc.code, exc.details)[1]))
    await exchange.write(SSE_DONE)
    await exchange.end()


async def send_json(exchange: Exchange, status: int, body: dict[str, Any],
                    headers: tuple[tuple[str, str], ...] = ()) -> None:
    await exchange.send(status, "application/json", to_json(body), headers)


def _timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise BadField(None, f"X-Request-Timeout: must be a number of seconds above 0, got {value!r}")
    return seconds


def error_body(status: int, message: str) -> bytes:
    """The body of an answer the HTTP server gives by itself (malformed HTTP, a deadline passed, a body over the cap,
    too many connections): the same OpenAI error every route answers with."""
    param = "body" if message.startswith("body:") else None
    return to_json(error(status, message, param))
