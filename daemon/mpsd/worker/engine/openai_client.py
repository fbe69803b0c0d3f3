"""One streamed call to an engine's OpenAI-compatible API, as the worker's TokenEvents and one Finished.

Generate goes to /v1/completions, Chat to /v1/chat/completions (the engine
renders the messages with its own template), both with stream=true and usage
asked for. The stdlib's http.client on a thread per call is enough: one
connection per call, read line by line as the engine writes; cancel() shuts
the socket from the thread the daemon's cancel arrives on, which ends the
engine's work on it as a client disconnect does. The model field is left out: mlx_lm.server
takes a model name it was not started with as one to load.
"""

from __future__ import annotations

import http.client
import json
import secrets
import socket
import threading
import time
from typing import Callable, Iterator

from mpsd.chat_params import ChatParams, ToolCall
from mpsd.generate_params import GenerateParams, InvalidRequest
from mpsd.oom import http_error_oom
from mpsd.worker.backends.base import Finished, TokenEvent, ToolCallEvent
from mpsd.worker.scheduler import DeadlinePassed, OutOfMemory  # what the service maps to gRPC statuses

ERROR_BODY_CHARS = 500
MAX_SOCKET_TIMEOUT_S = 7 * 24 * 3600.0


class EngineError(RuntimeError):
    """The engine failed this request some other way; the message says how."""


def completions_body(params: GenerateParams) -> dict:
    return {"prompt": params.prompt, **_sampling(params)}


def chat_body(chat: ChatParams) -> dict:
    body = {"messages": chat.openai_messages(), **_sampling(chat.sampling)}
    if chat.tools:
        body["tools"] = list(chat.tools)
        body["tool_choice"] = chat.tool_choice  # "auto" or "none": the constrained choices are refused before
    return body


def _sampling(params: GenerateParams) -> dict:
    body = {"max_tokens": params.max_tokens, "temperature": params.temperature, "top_p": params.top_p,
            "stream": True, "stream_options": {"include_usage": True}}
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    return body


class EngineCall:
    """One request: iterate for its events (TokenEvents, then one Finished); cancel() from any thread."""

    def __init__(self, port: int, path: str, body: dict, deadline: float | None, *, chat: bool,
                 count_prompt: Callable[[], int] | None = None) -> None:
        self._port = port
        self._count_prompt = count_prompt  # asked only when the engine's stream ends without prompt_tokens
        self._path = path
        self._body = json.dumps(body).encode()
        self._deadline = deadline
        self._chat = chat
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()
        with self._lock:
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=self._remaining())
        try:
            connection.connect()
            with self._lock:  # kept here: http.client drops connection.sock once a close-delimited response owns it
                self._sock = connection.sock
            if self.cancelled.is_set():  # cancel() came before there was a socket to shut
                return
            yield from self._stream(connection)
        except (OSError, http.client.HTTPException, EngineError) as exc:
            if self.cancelled.is_set():
                return  # the shut socket ends the read as an error or as a plain end of stream: either way, asked for
            if isinstance(exc, EngineError):
                raise
            if isinstance(exc, TimeoutError) and self._deadline is not None and time.monotonic() >= self._deadline:
                raise DeadlinePassed("deadline passed while the engine was answering") from None
            raise EngineError(f"engine connection failed: {type(exc).__name__}: {exc}") from None
        finally:
            connection.close()
            if self._sock is not None:
                self._sock.close()

    def _remaining(self) -> float | None:
        """The socket's timeout: the client's deadline, if it gave one a socket can take (gRPC's "none" is huge)."""
        if self._deadline is None or self._deadline - time.monotonic() > MAX_SOCKET_TIMEOUT_S:
            return None
        return max(0.001, self._deadline - time.monotonic())

    def _stream(self, connection: http.client.HTTPConnection) -> Iterator[TokenEvent | Finished]:
        connection.request("POST", self._path, body=self._body,
                           headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        with connection.getresponse() as response:
            yield from self._events(response)

    def _events(self, response: http.client.HTTPResponse) -> Iterator[TokenEvent | Finished]:
        if response.status != 200:
            raise _http_failure(response.status, response.read(64 << 10).decode("utf-8", "replace"))
        index, reason, usage, calls = 0, None, None, _EngineCalls()
        for chunk in sse_events(response):
            if self.cancelled.is_set():
                return
            if self._deadline is not None and time.monotonic() > self._deadline:
                raise DeadlinePassed("deadline passed while the engine was answering")
            if "error" in chunk:
                raise _http_failure(500, json.dumps(chunk["error"]))
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                text = _choice_text(choice, self._chat)
                if text:
                    yield TokenEvent(index, 0, text)
                    index += 1
                for event in calls.events(choice, index) if self._chat else ():
                    yield event
                    index += 1
                reason = choice.get("finish_reason") or reason
        if reason is None:
            raise EngineError("the engine ended its stream without a finish reason")
        if not (usage or {}).get("prompt_tokens") and self._count_prompt is not None:
            usage = {**(usage or {}), "prompt_tokens": self._count_prompt()}
        yield calls.finish(finished(reason, usage, index))


def sse_events(response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`; comments (keep-alives) skipped."""
    for raw in response:
        line = raw.decode("utf-8", "replace").strip()
        if not line.startswith("data:"):
            continue  # blank separators, ": keepalive" comments, event:/id: fields
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError:
            raise EngineError(f"the engine sent an event that is not JSON: {data[:200]!r}") from None
        if isinstance(event, dict):
            yield event


class _EngineCalls:
    """The engine's own `delta.tool_calls` as mpsd's ToolCallEvents, numbered from 0 in the order calls start,
    and the calls whole for the Finished: an engine that parses its model's tool calls loses none of them here."""

    def __init__(self) -> None:
        self._calls: dict[object, list[str]] = {}  # the engine's call index -> [id, name, arguments]

    def events(self, choice: dict, index: int) -> Iterator[ToolCallEvent]:
        for position, part in enumerate((choice.get("delta") or {}).get("tool_calls") or ()):
            key, function = part.get("index", position), part.get("function") or {}
            new = key not in self._calls
            call = self._calls.setdefault(key, [part.get("id") or "call_" + secrets.token_hex(12), "", ""])
            call[1] += function.get("name") or ""
            call[2] += function.get("arguments") or ""
            yield ToolCallEvent(index, 0, list(self._calls).index(key), call[0] if new else "",
                                function.get("name") or "", function.get("arguments") or "")

    def finish(self, done: Finished) -> Finished:
        if not self._calls:
            return done
        calls = tuple(ToolCall(*call) for call in self._calls.values())
        return Finished("tool_calls" if done.reason == "stop" else done.reason, done.prompt_tokens,
                        done.completion_tokens, done.cached_tokens, tool_calls=calls)


def _choice_text(choice: dict, chat: bool) -> str:
    if chat:
        return (choice.get("delta") or {}).get("content") or ""
    return choice.get("text") or ""


def finished(reason: str, usage: dict | None, chunks: int) -> Finished:
    """The engine's finish reason and usage as mpsd's; without usage, its text pieces count as tokens."""
    usage = usage or {}
    details = usage.get("prompt_tokens_details") or {}
    return Finished("length" if reason == "length" else "stop", int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or chunks), int(details.get("cached_tokens") or 0))


def _http_failure(status: int, body: str) -> Exception:
    text = " ".join(_error_message(body).split())[:ERROR_BODY_CHARS]
    if meaning := http_error_oom(status, body):
        return OutOfMemory(f"out of memory ({meaning}): the engine answered HTTP {status}: {text}")
    if 400 <= status < 500:
        return InvalidRequest(f"the engine refused the request (HTTP {status}): {text}")
    return EngineError(f"the engine answered HTTP {status}: {text}")


def _error_message(body: str) -> str:
    """OpenAI's {"error": {"message": ...}} where the engine gives it, else the body as it is."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data))
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error)
    return body
