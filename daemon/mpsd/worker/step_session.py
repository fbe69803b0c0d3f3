"""One Steps stream from the daemon: the requests it sent, by the daemon's numbers, from start to end.

A thread reads the daemon's side (requests and cancels) while the gRPC
thread that answers the stream sends the outbox's batches; this object is
what both share. A request counts as in flight from its arrival until the
message carrying its Finished or failure is handed to gRPC, or until the
daemon cancels it. The stream ending, however it ends (the daemon closed it,
the daemon went away), cancels every request still on it: nothing decodes for
a reader that is gone.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Iterable, Protocol

from mpsd.v1 import worker_pb2
from mpsd.worker.backends.base import Finished, TokenEvent, ToolCallEvent
from mpsd.worker.sinks import Event
from mpsd.worker.step_outbox import OutboxSink, StepOutbox


class Cancellable(Protocol):
    def cancel(self) -> None: ...


# (request, deadline as time.monotonic() seconds or None, sink) -> the running request; raises what refuses it
Submit = Callable[[worker_pb2.StepRequest, "float | None", OutboxSink], Cancellable]
# (inflight change, requests ended, tokens sent): the worker's own counters
Count = Callable[[int, int, int], None]


class StepSession:
    def __init__(self, submit: Submit, count: Count) -> None:
        self._submit = submit
        self._count = count
        self.outbox = StepOutbox()
        self._lock = threading.Lock()
        self._running: dict[int, Cancellable | None] = {}  # None: arrived, not yet handed to the decode loop
        self._sinks: dict[int, OutboxSink] = {}  # the same requests' sinks, which the daemon's `taken` reaches
        self._idle = threading.Event()  # set while nothing runs: what a stopping worker waits for
        self._idle.set()

    # -- the reading thread --------------------------------------------------

    def read(self, requests: Iterable[worker_pb2.StepRequest]) -> None:
        """Until the daemon's side ends or breaks; then every request still running is cancelled."""
        try:
            for request in requests:
                action = request.WhichOneof("action")
                if action == "taken":
                    if (sink := self._sinks.get(request.id)) is not None:
                        sink.take(request.taken)
                elif action == "cancel":
                    self._cancel(request.id)
                else:
                    self._start(request)
        except Exception:  # noqa: BLE001  (grpc raises when the stream breaks: the daemon is gone, nothing to tell)
            pass
        finally:
            self.end()

    def _start(self, request: worker_pb2.StepRequest) -> None:
        deadline = time.monotonic() + request.timeout_s if request.timeout_s > 0 else None
        sink = OutboxSink(self.outbox, request.id, request.window, request.stream_buffer, self._cut)
        with self._lock:
            self._running[request.id] = None
            self._sinks[request.id] = sink
            self._idle.clear()
        self._count(1, 0, 0)
        try:
            handle = self._submit(request, deadline, sink)
        except Exception as exc:  # noqa: BLE001  (a refused request fails alone, as its own event)
            sink.put(exc)
            sink.flush()
            return
        with self._lock:
            if request.id in self._running:
                self._running[request.id] = handle
                return
        handle.cancel()  # cancelled while it was being handed in

    def _cancel(self, request_id: int) -> None:
        handle = self._forget(request_id)
        if handle is not None:
            handle.cancel()

    def _cut(self, request_id: int, failure: BaseException) -> None:
        """Its client stopped reading (OutboxSink): the generation stops, and the failure goes past the window."""
        self._cancel(request_id)
        self.outbox.put(request_id, failure)
        self.outbox.flush()

    def _forget(self, request_id: int) -> Cancellable | None:
        with self._lock:
            if request_id not in self._running:
                return None
            handle = self._running.pop(request_id)
            self._sinks.pop(request_id, None)
            if not self._running:
                self._idle.set()
        self._count(-1, 1, 0)
        return handle

    # -- the sending thread --------------------------------------------------

    def sent(self, batch: list[tuple[int, Event]]) -> None:
        """After a batch went out: the requests it ended are no longer in flight; its tokens are counted."""
        tokens = 0
        for request_id, event in batch:
            if type(event) is TokenEvent or type(event) is ToolCallEvent:
                tokens += 1
            elif type(event) is Finished or isinstance(event, BaseException):
                self._forget(request_id)
        if tokens:
            self._count(0, 0, tokens)

    # -- either ----------------------------------------------------------------

    def end(self) -> None:
        """Cancels what still runs and closes the outbox, so the sending side finishes."""
        with self._lock:
            ids = list(self._running)
        for request_id in ids:
            self._cancel(request_id)
        self.outbox.close()

    def wait_idle(self, timeout_s: float) -> bool:
        return self._idle.wait(timeout_s)
