"""The daemon's side of the hop: one Steps stream per worker process, fanned out to the requests on it.

Every Generate and Chat routed to a worker goes in on that worker's one
stream, numbered; each message back carries a decode step's events for all
of them (worker/step_outbox.py), and the reader task here hands each event
to its request's TokenStream. The stream opens with the first request and
again after it ended. It breaking (the worker died) fails every TokenStream
on it with StreamLost, which the inference service reports as UNAVAILABLE (or
retries, before a first token). The reader never waits on a client: a
request's events wait in its TokenStream until its task writes them out, and
each request has a window of its own, as an HTTP/2 stream does: the worker
sends at most WINDOW events beyond what the daemon has taken, and the daemon
says how many it has taken every WINDOW / 2. So a client that stops reading
holds at most a window here; the rest wait in the worker, which cuts that
request alone once `stream_buffer` wait and no word of taking came for a
while (worker/step_outbox.py), and the other rows of the batch go on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from typing import Any

import grpc

from mpsd.v1 import worker_pb2

log = logging.getLogger("mpsd.worker")
CODES = {code.value[0]: code for code in grpc.StatusCode}
REQUEST_FIELDS = {"Generate": "generate", "Chat": "chat"}
WINDOW = 256  # events of one request the worker may send beyond what the daemon has handed to its client


class StreamLost(Exception):
    """The worker's stream ended under this request: the worker went away."""


class WorkerAnswered(Exception):
    """The worker ended the request with a status of its own (bad input, out of memory, a deadline, a bug)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class DeadlinePassed(Exception):
    """The request's deadline passed before its worker ended it."""


class TokenStream:
    """One request's events, buffered between the link's reader and the task that writes them to the client."""

    __slots__ = ("_connection", "_id", "_items", "_waiter", "_end", "_ended_by_worker", "_timer", "_taken")

    def __init__(self, connection: "_Connection", request_id: int, timeout_s: float | None) -> None:
        self._connection = connection
        self._id = request_id
        self._taken = 0  # events handed to the request's task: the worker may send WINDOW beyond it
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._end: BaseException | None = None   # raised once the buffered events are read
        self._ended_by_worker = False
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(timeout_s, self._expire) if timeout_s is not None else None

    # -- the reader's side -----------------------------------------------------

    def deliver(self, event: worker_pb2.StepEvent) -> None:
        if self._end is not None:
            return
        self._items.append(event)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._end is None:
            self._end = exc
            self._wake()

    def _expire(self) -> None:
        self._stop(DeadlinePassed("deadline passed while generating"))

    def _stop(self, exc: BaseException) -> None:
        """Ends the request here and at the worker: the events already buffered are still read first."""
        self.fail(exc)
        self._connection.cancel(self._id)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the request's side ------------------------------------------------

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self):
        """The next GenerateResponse; StopAsyncIteration after the Finish; raises how the request ended otherwise."""
        while not self._items:
            if self._ended_by_worker:
                raise StopAsyncIteration
            if self._end is not None:
                raise self._end
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
            self._waiter = None
        event = self._items.popleft()
        self._taken += 1
        if not self._taken % (WINDOW // 2):
            self._connection.send(worker_pb2.StepRequest(id=self._id, taken=self._taken))
        if event.code:
            self._ended_by_worker = True
            raise WorkerAnswered(CODES.get(event.code, grpc.StatusCode.UNKNOWN), event.details)
        response = event.response
        if response.HasField("finish"):
            self._ended_by_worker = True
        return response

    def close(self) -> None:
        """However the request ended: the link forgets it, and a worker still generating for it is told to stop."""
        if self._timer is not None:
            self._timer.cancel()
        if self._connection.forget(self._id) and not self._ended_by_worker:
            self._connection.cancel(self._id)


class _Connection:
    """One Steps call and the requests on it; a broken one is replaced, never reused."""

    def __init__(self, stub: Any, worker_id: str) -> None:
        self.worker_id = worker_id
        self.streams: dict[int, TokenStream] = {}
        self.broken = False
        self._outgoing: asyncio.Queue = asyncio.Queue()
        self._call = stub.Steps(self._requests())
        self.reader = asyncio.get_running_loop().create_task(self._read())

    def send(self, request: worker_pb2.StepRequest) -> None:
        if not self.broken:
            self._outgoing.put_nowait(request)

    def cancel(self, request_id: int) -> None:
        self.send(worker_pb2.StepRequest(id=request_id, cancel=True))

    def forget(self, request_id: int) -> bool:
        return self.streams.pop(request_id, None) is not None

    async def _requests(self):
        while True:
            yield await self._outgoing.get()

    async def _read(self) -> None:
        reason = "the worker closed its stream"
        try:
            async for message in self._call:
                streams = self.streams
                for event in message.events:
                    stream = streams.get(event.id)
                    if stream is not None:
                        stream.deliver(event)
        except grpc.aio.AioRpcError as exc:
            reason = f"{exc.code().name}: {exc.details()}"
        except asyncio.CancelledError:
            reason = "mpsd closed the worker's stream"
        finally:
            self.broken = True
            self._call.cancel()
            lost = StreamLost(reason)
            for stream in list(self.streams.values()):
                stream.fail(lost)
            self.streams.clear()

    async def close(self) -> None:
        self._call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class WorkerLink:
    """What the daemon calls one worker process by: its stub (Predict), and Steps for Generate and Chat."""

    def __init__(self, stub: Any, worker_id: str) -> None:
        self.stub = stub
        self.worker_id = worker_id
        self._connection: _Connection | None = None
        self._ids = itertools.count(1)

    def open(self, method: str, request, timeout_s: float | None, stream_buffer: int) -> TokenStream:
        """Sends `request` (a GenerateRequest for "Generate", a ChatRequest for "Chat") and returns its events.
        timeout_s: what is left of the client's deadline; it is the worker's too, and ends the stream here.
        stream_buffer: events the worker may hold for a client that stops reading before it cuts the request."""
        connection = self.connect()
        request_id = next(self._ids)
        stream = TokenStream(connection, request_id, timeout_s)
        connection.streams[request_id] = stream
        connection.send(worker_pb2.StepRequest(id=request_id, timeout_s=timeout_s or 0.0, window=WINDOW,
                                               stream_buffer=stream_buffer, **{REQUEST_FIELDS[method]: request}))
        return stream

    def connect(self) -> "_Connection":
        """The stream, opened now if it is not open: when the worker turns READY, so a first request pays nothing."""
        connection = self._connection
        if connection is None or connection.broken:
            connection = self._connection = _Connection(self.stub, self.worker_id)
        return connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
