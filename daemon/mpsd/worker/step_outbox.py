"""The worker's side of the hop: every request's events of a step, sent to the daemon as one message.

The decode loop (or an engine's relay threads) put events into a request's
OutboxSink and flush once per step; the gRPC thread that answers the
daemon's Steps stream takes everything flushed so far at once and sends it as
one StepEvents. If the daemon reads slower than steps come, the next message
simply carries more: nothing waits on the daemon but this one thread. Each
request also has a window of its own (OutboxSink), so one slow client holds
back only its own events.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Callable

import grpc

from mpsd.v1 import inference_pb2, worker_pb2
from mpsd.worker.backends.base import Finished, TokenEvent, ToolCallEvent
from mpsd.worker.sinks import Event

STALL_S = 0.25  # a request holding stream_buffer events is cut once no `taken` has come for this long
# (the failure a request ended with) -> its gRPC status code and sentence (server.py decides what each means)
FailureStatus = Callable[[BaseException], tuple[grpc.StatusCode, str]]


class StepOutbox:
    """What is ready for the daemon: (request id, event) pairs in order; a step's become visible at its flush."""

    def __init__(self) -> None:
        self._ready = threading.Condition()
        self._pending: list[tuple[int, Event]] = []
        self._visible = 0  # how many of _pending were flushed: a step half put is not sent half
        self._closed = False

    def put(self, request_id: int, event: Event) -> None:
        with self._ready:
            self._pending.append((request_id, event))

    def flush(self) -> None:
        with self._ready:
            if len(self._pending) > self._visible:
                self._visible = len(self._pending)
                self._ready.notify()

    def close(self) -> None:
        """No more messages: take() returns what is left, then None."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def take(self) -> list[tuple[int, Event]] | None:
        """Blocks until a flush; everything flushed so far at once. None once closed and empty."""
        with self._ready:
            while not self._visible and not self._closed:
                self._ready.wait()
            count = len(self._pending) if self._closed else self._visible
            batch, self._pending = self._pending[:count], self._pending[count:]
            self._visible = 0
        return batch or None


class OutboxSink:
    """One request's events, into its stream's outbox under the daemon's number for it, within its window.

    At most `window` events go out beyond what the daemon says it has handed
    to the client (`taken`); the rest wait here, in order, so a client that
    reads slowly holds its own events (here, and at most a window of them in
    the daemon) and never the stream's other requests. Once `stream_buffer`
    events wait here and no `taken` has come for STALL_S, the client has
    stopped reading: `cut` ends the request (its generation stopped, an
    RESOURCE_EXHAUSTED saying why sent past the window), and the other rows go
    on. A client that keeps reading is never cut, however far a zero-cost model
    runs ahead of it.
    """

    __slots__ = ("_outbox", "_request_id", "_window", "_stream_buffer", "_cut", "_lock", "_sent", "_taken",
                 "_held", "_taken_at", "_done")

    def __init__(self, outbox: StepOutbox, request_id: int, window: int = 0, stream_buffer: int = 0,
                 cut: Callable[[int, BaseException], None] | None = None) -> None:
        self._outbox = outbox
        self._request_id = request_id
        self._window = window or 1 << 62  # 0: no window
        self._stream_buffer = stream_buffer or 1 << 62
        self._cut = cut
        self._lock = threading.Lock()
        self._sent = 0
        self._taken = 0
        self._held: collections.deque[Event] = collections.deque()
        self._taken_at = time.monotonic()
        self._done = False

    def put(self, event: Event) -> None:
        with self._lock:
            if self._done:
                return
            if not self._held and self._sent - self._taken < self._window:
                self._sent += 1
                self._outbox.put(self._request_id, event)
                return
            self._held.append(event)
            stalled = (len(self._held) >= self._stream_buffer
                       and time.monotonic() - self._taken_at >= STALL_S)
            if stalled:
                self._done = True
                self._held.clear()
        if stalled:
            self._cut(self._request_id, ClientTooSlow(
                f"the client read too slowly: {self._stream_buffer} tokens (stream_buffer) waited for it and it "
                f"took none for {STALL_S:g}s; its stream was cut so the other streams of its worker go on"))

    def take(self, taken: int) -> None:
        """The daemon handed `taken` events to the client so far: what waits here may go, up to the window."""
        with self._lock:
            self._taken, self._taken_at = taken, time.monotonic()
            moved = 0
            while self._held and self._sent - self._taken < self._window:
                self._sent += 1
                moved += 1
                self._outbox.put(self._request_id, self._held.popleft())
        if moved:
            self._outbox.flush()

    def flush(self) -> None:
        self._outbox.flush()

    def closed_early(self) -> None:
        pass  # only the daemon cancels (or a cut, which sent its own failure), and nothing more is expected


class ClientTooSlow(Exception):
    """The daemon's client stopped reading: its request is cut (RESOURCE_EXHAUSTED), no one else's."""


def encode(batch: list[tuple[int, Event]], worker_id: str, pid: int,
           failure_status: FailureStatus) -> worker_pb2.StepEvents:
    """The one message for a batch of events: a GenerateResponse per token or Finish, a status per failure."""
    message = worker_pb2.StepEvents()
    add = message.events.add
    for request_id, event in batch:
        if type(event) is TokenEvent:  # fields set in place: no message built per token and copied in
            response = add(id=request_id).response
            response.index, response.text, response.token_id = event.index, event.text, max(event.token_id, 0)
        elif type(event) is Finished:
            add(id=request_id, response=inference_pb2.GenerateResponse(finish=inference_pb2.Finish(
                reason=event.reason, worker_id=worker_id, worker_pid=pid,
                usage=inference_pb2.Usage(prompt_tokens=event.prompt_tokens,
                                          completion_tokens=event.completion_tokens,
                                          cached_tokens=event.cached_tokens),
                tool_calls=[inference_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                            for c in event.tool_calls],
                detail=event.detail)))
        elif type(event) is ToolCallEvent:
            response = add(id=request_id).response
            response.index, response.token_id = event.index, max(event.token_id, 0)
            delta = response.tool_call
            delta.index, delta.id, delta.name, delta.arguments = event.call_index, event.id, event.name, event.arguments
        else:
            code, details = failure_status(event)
            add(id=request_id, code=code.value[0], details=details)
    return message
