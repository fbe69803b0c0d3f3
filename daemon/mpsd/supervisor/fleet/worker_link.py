"""The daemon's side of the hop: one Steps connection per worker process, fanned out to the requests on it.

Every Generate and Chat routed to a worker goes in on that worker's one
stream, numbered; each message back carries a decode step's events for all
of them (worker/step_outbox.py), and the reader task here hands each event
to its request's TokenStream. The stream opens when the worker turns READY
(or with the next request, after it ended). It breaking (the worker died) fails every TokenStream
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
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mpsd.step_frames import HEADER, FrameError, frame, frame_length
from mpsd.v1 import worker_pb2

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


class StreamDeadline(Exception):
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
        self._stop(StreamDeadline("deadline passed while generating"))

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
    """One connection to the worker's Steps socket and the requests on it; a broken one is replaced, never reused."""

    def __init__(self, path: str, worker_id: str) -> None:
        self.worker_id = worker_id
        self.streams: dict[int, TokenStream] = {}
        self.broken = False
        self._writer: asyncio.StreamWriter | None = None
        self._unsent: list[bytes] = []  # frames sent before the socket opened
        self.reader = asyncio.get_running_loop().create_task(self._run(path))

    def send(self, request: worker_pb2.StepRequest) -> None:
        """Never waits: what the daemon sends is small (requests, cancels, taken) and bounded by the requests."""
        if self.broken:
            return
        data = frame(request.SerializeToString())
        if self._writer is None:
            self._unsent.append(data)
        else:
            self._writer.write(data)

    def cancel(self, request_id: int) -> None:
        self.send(worker_pb2.StepRequest(id=request_id, cancel=True))

    def forget(self, request_id: int) -> bool:
        return self.streams.pop(request_id, None) is not None

    async def _run(self, path: str) -> None:
        reason = "the worker closed its stream"
        try:
            reader, self._writer = await asyncio.open_unix_connection(path)
            self._writer.writelines(self._unsent)
            self._unsent.clear()
            await self._read(reader)
        except asyncio.IncompleteReadError:
            pass  # the worker closed it: it exited, or is stopping
        except (OSError, FrameError, DecodeError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            reason = "mpsd closed the worker's stream"
        finally:
            self.broken = True
            if self._writer is not None:
                self._writer.close()
            lost = StreamLost(reason)
            for stream in list(self.streams.values()):
                stream.fail(lost)
            self.streams.clear()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        """Each frame is a step's events; each event goes to its request (none: it was cancelled or has ended)."""
        streams = self.streams
        while True:
            length = frame_length(await reader.readexactly(HEADER.size))
            message = worker_pb2.StepEvents.FromString(await reader.readexactly(length))
            for event in message.events:
                stream = streams.get(event.id)
                if stream is not None:
                    stream.deliver(event)

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)


class WorkerLink:
    """What the daemon calls one worker process by: its gRPC stub (Predict), and its Steps socket for Generate and
    Chat (step_frames.py says why a socket of its own)."""

    def __init__(self, stub: Any, worker_id: str, steps_path: str) -> None:
        self.stub = stub
        self.worker_id = worker_id
        self._steps_path = steps_path
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
            connection = self._connection = _Connection(self._steps_path, self.worker_id)
        return connection

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
