"""A small Python client for mpsd's public API, sync (`Client`) and asyncio (`AsyncClient`).

mpsctl and the tests use it, so it is the reference for what a client should
do: stream tokens as they come, stop the worker when the caller stops reading
(the call is cancelled when the iterator is closed or garbage-collected), and
turn gRPC status codes into exceptions a caller can catch by meaning.

    with Client() as client:
        stream = client.generate("The module", max_tokens=40)
        for token in stream:
            print(token.text, end="", flush=True)
        print(stream.finish)
        reply = client.chat([{"role": "user", "content": "Hello"}], max_tokens=40).text()

numpy is imported only by predict(), so generating needs only grpcio.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import json
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

import grpc

from mpsd.balancing import channel_options, channel_target, split_addresses
from mpsd.v1 import inference_pb2, inference_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:7700"


class MpsdError(Exception):
    """Any refusal or failure from mpsd; `code` is the gRPC status, `details` mpsd's sentence."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


class InvalidRequest(MpsdError):
    """INVALID_ARGUMENT or FAILED_PRECONDITION: the request is wrong; retrying it will not help."""


class ModelNotFound(MpsdError):
    """NOT_FOUND: no model of that name is configured."""


class Overloaded(MpsdError):
    """RESOURCE_EXHAUSTED: the model's queue is full (or the request ran out of memory); retry later."""


class Unavailable(MpsdError):
    """UNAVAILABLE: no worker could serve, the worker died mid-stream, mpsd is draining, or it is not running."""


class DeadlineExceeded(MpsdError):
    """DEADLINE_EXCEEDED: the deadline passed, possibly while queued."""


class Unauthenticated(MpsdError):
    """UNAUTHENTICATED: mpsd requires a bearer token and this one is missing or wrong."""


_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Overloaded,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
}


def error_from(exc: grpc.RpcError) -> MpsdError:
    return _ERRORS.get(exc.code(), MpsdError)(exc.code(), exc.details() or "")


@dataclasses.dataclass(frozen=True)
class Token:
    """One streamed piece of the answer, as plain data: code using the client never handles protobuf.

    `text` may be "" (a token that ends mid-character, or text held back while
    a stop sequence may be starting); that text comes with a later token.
    """

    index: int
    text: str
    token_id: int


@dataclasses.dataclass(frozen=True)
class Finish:
    """How a stream ended ("stop" or "length"), what it cost in tokens, and which worker process served it."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    worker_id: str
    worker_pid: int

    @classmethod
    def from_message(cls, finish: inference_pb2.Finish) -> "Finish":
        return cls(finish.reason, finish.usage.prompt_tokens, finish.usage.completion_tokens,
                   finish.worker_id, finish.worker_pid)


def generate_request(prompt: str, model: str = "", *, max_tokens: int | None = None, temperature: float | None = None,
                     top_p: float | None = None, seed: int | None = None, stop: tuple[str, ...] = ()) -> inference_pb2.GenerateRequest:
    """Unset options stay unset, so the daemon's documented defaults apply."""
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt, stop=list(stop))
    for field, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(request, field, value)
    return request


def chat_request(messages: Sequence[Mapping[str, str]], model: str = "", *, tools: Sequence[Mapping] | None = None,
                 **options: Any) -> inference_pb2.ChatRequest:
    """messages: {"role": ..., "content": ...} in order; options as for generate_request."""
    sampling = generate_request("", model, **options)
    return inference_pb2.ChatRequest(
        model=model, messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        tools_json=json.dumps(list(tools)) if tools else "",
        **{field.name: value for field, value in sampling.ListFields() if field.name not in ("model", "prompt")})


def _predict_request(model: str, inputs: Mapping[str, Any]) -> inference_pb2.PredictRequest:
    from mpsd.worker.tensors import to_tensor

    return inference_pb2.PredictRequest(model=model, inputs={name: to_tensor(array) for name, array in inputs.items()})


def _outputs(reply: inference_pb2.PredictResponse) -> dict[str, Any]:
    from mpsd.worker.tensors import to_array

    return {name: to_array(name, tensor) for name, tensor in reply.outputs.items()}


def _token_or_finish(message: inference_pb2.GenerateResponse) -> Token | Finish:
    if message.HasField("finish"):
        return Finish.from_message(message.finish)
    return Token(message.index, message.text, message.token_id)


class _Connection:
    """Address, TLS and token: what both clients share. `grpc_module` is grpc or grpc.aio."""

    def __init__(self, grpc_module, address: str | Sequence[str] | None, tls_ca: pathlib.Path | str | None,
                 token: str | None, timeout: float | None, health_service: str = "", retry: bool = False) -> None:
        addresses = split_addresses(address or os.environ.get("MPSD_ADDRESS") or DEFAULT_ADDRESS)
        self.address = ",".join(addresses)
        target, options = channel_target(addresses), channel_options(addresses, health_service, retry)
        if tls_ca:
            credentials = grpc.ssl_channel_credentials(pathlib.Path(tls_ca).read_bytes())
            self.channel = grpc_module.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc_module.insecure_channel(target, options=options)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def call_options(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": timeout or self.timeout, "metadata": self.metadata}


class Generation:
    """The tokens of one Generate call, in order; `finish` is set once the stream has ended."""

    def __init__(self, call) -> None:
        self._call = call
        self.finish: Finish | None = None

    def __iter__(self) -> Iterator[Token]:
        try:
            for message in self._call:
                item = _token_or_finish(message)
                if isinstance(item, Finish):
                    self.finish = item
                else:
                    yield item
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        finally:
            self._call.cancel()  # a caller that stops reading stops the worker too

    def text(self) -> str:
        """Reads the whole stream and returns its text."""
        return "".join(token.text for token in self)

    def cancel(self) -> None:
        self._call.cancel()


class AsyncGeneration:
    """Generation for asyncio: `async for token in stream`, then `stream.finish`."""

    def __init__(self, call) -> None:
        self._call = call
        self.finish: Finish | None = None

    async def __aiter__(self) -> AsyncIterator[Token]:
        try:
            async for message in self._call:
                item = _token_or_finish(message)
                if isinstance(item, Finish):
                    self.finish = item
                else:
                    yield item
        except grpc.aio.AioRpcError as exc:
            raise error_from(exc) from None
        finally:
            self._call.cancel()

    async def text(self) -> str:
        return "".join([token.text async for token in self])

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """Blocking client; one channel, reused by every call. Use as a context manager or call close()."""

    def __init__(self, address: str | Sequence[str] | None = None, *, tls_ca: pathlib.Path | str | None = None,
                 token: str | None = None, timeout: float | None = 300.0, health_service: str = "",
                 retry: bool = False) -> None:
        """address: HOST:PORT; several ("h1:7700,h2:7700" or a list) or a dns:/// name spread the calls over the hosts
        serving `health_service` (a model name; "" = the daemon), retrying UNAVAILABLE elsewhere (mpsd.balancing).
        retry: the retry policy on one address too (a proxy such as nginx in front of several hosts)."""
        self._conn = _Connection(grpc, address, tls_ca, token, timeout, health_service, retry)

    @property
    def address(self) -> str:
        return self._conn.address

    def generate(self, prompt: str, model: str = "", *, timeout: float | None = None, **options: Any) -> Generation:
        """Options: max_tokens, temperature, top_p, seed, stop (see docs/api.md)."""
        request = generate_request(prompt, model, **options)
        return Generation(self._conn.stub.Generate(request, **self._conn.call_options(timeout)))

    def chat(self, messages: Sequence[Mapping[str, str]], model: str = "", *, timeout: float | None = None,
             **options: Any) -> Generation:
        """The model's reply to a conversation, rendered with its own chat template; options as for generate, and
        tools (a list of tool definitions, for templates that take them)."""
        request = chat_request(messages, model, **options)
        return Generation(self._conn.stub.Chat(request, **self._conn.call_options(timeout)))

    def predict(self, model: str, inputs: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """numpy arrays in, numpy arrays out (named as the model returns them)."""
        try:
            reply = self._conn.stub.Predict(_predict_request(model, inputs), **self._conn.call_options(timeout))
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return _outputs(reply)

    def close(self) -> None:
        self._conn.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class AsyncClient:
    """The same calls for asyncio code."""

    def __init__(self, address: str | Sequence[str] | None = None, *, tls_ca: pathlib.Path | str | None = None,
                 token: str | None = None, timeout: float | None = 300.0, health_service: str = "",
                 retry: bool = False) -> None:
        self._conn = _Connection(grpc.aio, address, tls_ca, token, timeout, health_service, retry)

    def generate(self, prompt: str, model: str = "", *, timeout: float | None = None, **options: Any) -> AsyncGeneration:
        request = generate_request(prompt, model, **options)
        return AsyncGeneration(self._conn.stub.Generate(request, **self._conn.call_options(timeout)))

    def chat(self, messages: Sequence[Mapping[str, str]], model: str = "", *, timeout: float | None = None,
             **options: Any) -> AsyncGeneration:
        request = chat_request(messages, model, **options)
        return AsyncGeneration(self._conn.stub.Chat(request, **self._conn.call_options(timeout)))

    async def predict(self, model: str, inputs: Mapping[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        try:
            reply = await self._conn.stub.Predict(_predict_request(model, inputs), **self._conn.call_options(timeout))
        except grpc.aio.AioRpcError as exc:
            raise error_from(exc) from None
        return _outputs(reply)

    async def close(self) -> None:
        await self._conn.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
