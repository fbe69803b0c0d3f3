"""The worker's side of the hop: every request's events of a step, sent to the daemon as one message.

The decode loop (or an engine's relay threads) put events into a request's
OutboxSink and flush once per step; the gRPC thread that answers the
daemon's Steps stream takes everything flushed so far at once and sends it as
one StepEvents. If the daemon reads slower than steps come, the next message
simply carries more: nothing waits on the daemon but this one thread.
"""

from __future__ import annotations

import threading
from typing import Callable

import grpc

from mpsd.v1 import inference_pb2, worker_pb2
from mpsd.worker.backends.base import Finished, TokenEvent
from mpsd.worker.sinks import Event

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
    """One request's events, into its stream's outbox under the daemon's number for it."""

    __slots__ = ("_outbox", "_request_id")

    def __init__(self, outbox: StepOutbox, request_id: int) -> None:
        self._outbox = outbox
        self._request_id = request_id

    def put(self, event: Event) -> None:
        self._outbox.put(self._request_id, event)

    def flush(self) -> None:
        self._outbox.flush()

    def closed_early(self) -> None:
        pass  # only the daemon cancels, and it expects nothing more for that request


def encode(batch: list[tuple[int, Event]], worker_id: str, pid: int,
           failure_status: FailureStatus) -> worker_pb2.StepEvents:
    """The one message for a batch of events: a GenerateResponse per token or Finish, a status per failure."""
    message = worker_pb2.StepEvents()
    add = message.events.add
    for request_id, event in batch:
        if type(event) is TokenEvent:
            add(id=request_id, response=inference_pb2.GenerateResponse(
                index=event.index, text=event.text, token_id=max(event.token_id, 0)))
        elif type(event) is Finished:
            add(id=request_id, response=inference_pb2.GenerateResponse(finish=inference_pb2.Finish(
                reason=event.reason, worker_id=worker_id, worker_pid=pid,
                usage=inference_pb2.Usage(prompt_tokens=event.prompt_tokens,
                                          completion_tokens=event.completion_tokens,
                                          cached_tokens=event.cached_tokens))))
        else:
            code, details = failure_status(event)
            add(id=request_id, code=code.value[0], details=details)
    return message
