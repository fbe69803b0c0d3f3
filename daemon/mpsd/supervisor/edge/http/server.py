"""A small HTTP/1.1 server on the daemon's event loop: h11 for the protocol, asyncio streams for the sockets.

Why h11 (python-hyper's sans-I/O HTTP/1.1, the parser under uvicorn's h11
mode and httpcore): it is pure Python with no dependencies and adds nothing
measurable to the daemon's memory, where importing aiohttp's server beside grpc
took the daemon from 29 to 44 MiB RSS (measured here, Python 3.11, aiohttp
3.14). What h11 leaves to us is small and lives here: keep-alive, a body cap
answered 413 before the body is read, read timeouts, TLS through asyncio, and
noticing a client that leaves mid-response so its generation stops.

Handlers run on the event loop like the gRPC servicers, so they reach the
router and pools directly: no second proxy hop, no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from typing import Awaitable, Callable

import h11

log = logging.getLogger("mpsd.http")
READ_CHUNK_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 2.0                 # after a refusal: how long the rest of the client's request is read and dropped
LINGER_MAX_BYTES = 64 << 20    # ... and how much of it
IDLE_TIMEOUT_S = 60.0  # waiting for a request (keep-alive) or the rest of one: then the connection is closed


class ClientGone(ConnectionError):
    """The client closed the connection: nothing more can be sent to it."""


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str                  # without the query string
    headers: dict[str, str]    # names lower-cased; a repeated header keeps its last value
    body: bytes


class Exchange:
    """The answer to one request: `send` a whole response, or `start` one and `write` pieces of it, then `end`."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter) -> None:
        self._conn, self.writer = conn, writer
        self.started = False

    async def send(self, status: int, content_type: str, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        await self.start(status, content_type, headers + (("content-length", str(len(body))),))
        await self.write(body)
        await self.end()

    async def start(self, status: int, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Without a content-length h11 frames the body as chunks (HTTP/1.1) or by closing (HTTP/1.0)."""
        self.started = True
        await self._put(h11.Response(status_code=status, headers=[("content-type", content_type), *headers]))

    async def write(self, data: bytes) -> None:
        if data:
            await self._put(h11.Data(data=data))

    async def end(self) -> None:
        await self._put(h11.EndOfMessage())

    async def _put(self, event) -> None:
        if self.writer.is_closing():
            raise ClientGone("the client closed the connection")
        self.writer.write(self._conn.send(event))
        try:
            await self.writer.drain()  # back-pressure: a slow reader slows its own stream only
        except ConnectionError as exc:
            raise ClientGone(str(exc)) from None


Handler = Callable[[HttpRequest, Exchange], Awaitable[None]]
# (status, message) -> the body of an error answer the server gives by itself (bad HTTP, 413), as JSON.
ErrorBody = Callable[[int, str], bytes]


class HttpServer:
    """The listening socket and its connections; close() ends both."""

    def __init__(self, handler: Handler, error_body: ErrorBody, max_body_bytes: int) -> None:
        self._handler, self._error_body, self._max_body_bytes = handler, error_body, max_body_bytes
        self._connections: set[asyncio.Task] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Binds host:port (port 0: any free one) and returns the port; raises OSError when it cannot bind."""
        self._server = await asyncio.start_server(self._connection, host.strip("[]"), port, ssl=ssl_context)
        return self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while await self._one_exchange(conn, reader, writer):
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, reader, writer, exc.error_status_hint, f"bad HTTP request: {exc}")
        except (ClientGone, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a client that leaves, stalls or breaks TLS just loses its connection
        finally:
            self._connections.discard(task)
            writer.close()

    async def _one_exchange(self, conn: h11.Connection, reader, writer) -> bool:
        """Reads one request and answers it; True while the connection may carry another."""
        event = await _next_event(conn, reader)
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        length = dict(event.headers).get(b"content-length")
        if length is not None and int(length) > self._max_body_bytes:
            await self._refuse(conn, reader, writer, 413, self._too_large())
            return False
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = await self._read_body(conn, reader)
        if body is None:
            await self._refuse(conn, reader, writer, 413, self._too_large())
            return False
        target = event.target.decode("latin-1")
        request = HttpRequest(method=event.method.decode("latin-1"), path=target.partition("?")[0],
                              headers={k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}, body=body)
        if not await self._handle_watching(request, Exchange(conn, writer), conn, reader):
            return False
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_body(self, conn: h11.Connection, reader) -> bytes | None:
        """The whole body, or None once it grows past the cap (a chunked upload has no length to check first)."""
        chunks, size = [], 0
        while True:
            event = await _next_event(conn, reader)
            if isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone("the client closed the connection mid-request")
            size += len(event.data)
            if size > self._max_body_bytes:
                return None
            chunks.append(event.data)

    async def _handle_watching(self, request: HttpRequest, exchange: Exchange, conn: h11.Connection, reader) -> bool:
        """Runs the handler while watching the socket: a client that closes cancels the handler (and so its
        generation), as a cancelled gRPC call does. False when the client left."""
        handling = asyncio.create_task(self._handler(request, exchange))
        watching = asyncio.create_task(_until_closed(conn, reader))
        try:
            done, _ = await asyncio.wait({handling, watching}, return_when=asyncio.FIRST_COMPLETED)
            if handling not in done and not _client_left(watching):
                await asyncio.wait({handling})  # it stopped reading a client piling up requests: finish this one
        finally:
            for task in (handling, watching):
                task.cancel()
            await asyncio.wait({handling, watching})
        if not handling.cancelled() and (exc := handling.exception()) is not None and not isinstance(exc, ClientGone):
            log.error("HTTP %s %s failed", request.method, request.path, exc_info=exc)
            if not exchange.started:
                await self._refuse(conn, reader, exchange.writer, 500, f"mpsd failed to answer: {type(exc).__name__}: {exc}")
            return False
        return not _client_left(watching)

    def _too_large(self) -> str:
        return f"body: over the limit of {self._max_body_bytes} bytes"

    async def _refuse(self, conn: h11.Connection, reader, writer, status: int, message: str) -> None:
        """An answer the server gives by itself; then the connection closes once the client has read it."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = self._error_body(status, message)
        exchange = Exchange(conn, writer)
        with contextlib.suppress(ClientGone, h11.LocalProtocolError):
            await exchange.send(status, "application/json", body, (("connection", "close"),))
            await _linger(reader, writer)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader):
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await asyncio.wait_for(reader.read(READ_CHUNK_BYTES), IDLE_TIMEOUT_S))


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads and drops what the client still sends (the rest of a refused body) before closing: closing a socket
    with unread input makes the kernel send a reset, which can destroy the answer before the client reads it."""
    if writer.can_write_eof():
        writer.write_eof()  # the client sees the answer end; TLS cannot half-close, and its framing says the same
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            for _ in range(LINGER_MAX_BYTES // READ_CHUNK_BYTES):
                if not await reader.read(READ_CHUNK_BYTES):
                    return


def _client_left(watching: asyncio.Task) -> bool:
    if not watching.done() or watching.cancelled():
        return False
    return watching.exception() is not None or watching.result()


async def _until_closed(conn: h11.Connection, reader: asyncio.StreamReader) -> bool:
    """Returns True once the client closes; bytes it sends meanwhile (a pipelined request) wait in h11."""
    while True:
        data = await reader.read(READ_CHUNK_BYTES)
        if not data:
            return True
        conn.receive_data(data)
        if len(conn.trailing_data[0]) > MAX_HEAD_BYTES:
            return False  # a client piling up requests: stop reading; TCP holds back the rest
