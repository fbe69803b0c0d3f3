"""A small HTTP/1.1 server on the daemon's event loop: h11 for the protocol, asyncio streams for the sockets.

Why h11 (python-hyper's sans-I/O HTTP/1.1, the parser under uvicorn's h11
mode and httpcore): it is pure Python with no dependencies and adds 1.4 MiB to
a daemon-like process where aiohttp.web adds 10.6 and uvicorn+starlette 5.7, at
the same p50 (`python -m benchmarks http_edge`; they stream SSE ~1.6x faster,
which at mpsd's token rates is ~1% of a core: docs/performance.md). What h11 leaves to us lives here, under one HttpLimits for every
address the server listens on: keep-alive, deadlines for the idle wait, the
head, the body and each write, a cap on connections, a body cap answered 413
before the body is read, TLS through asyncio, and noticing a client that
leaves mid-response so its generation stops.

The server knows nothing of what it serves: a handler gets an HttpRequest and
answers through an Exchange, so another HTTP library could take h11's place
behind the same two types. Handlers run on the event loop like the gRPC
servicers, so they reach the router and pools directly: no second proxy hop,
no thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from typing import Awaitable, Callable

import h11

from mpsd.config import HttpLimits

log = logging.getLogger("mpsd.http")
READ_CHUNK_BYTES = 64 * 1024
LINGER_S = 2.0                 # after a refusal: how long the rest of the client's request is read and dropped
LINGER_MAX_BYTES = 64 << 20    # ... and how much of it


class ClientGone(ConnectionError):
    """The client closed the connection, or stopped reading it: nothing more can be sent to it."""


class _Expired(Exception):
    """A deadline of the connection passed; `status` is the answer owed first (None: close without one)."""

    def __init__(self, status: int | None, message: str = "") -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str                  # without the query string
    headers: dict[str, str]    # names lower-cased; a repeated header keeps its last value
    body: bytes


class Exchange:
    """The answer to one request: `send` a whole response, or `start` one and `write` pieces of it, then `end`.

    A write the client does not take within the send timeout cuts this
    connection (ClientGone), so a reader that stalls holds only itself.
    The body of an answer to HEAD is dropped here, so handlers answer HEAD
    as they answer GET.
    """

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, send_timeout_s: float,
                 head_only: bool = False) -> None:
        self._conn, self.writer = conn, writer
        self._send_timeout_s, self._head_only = send_timeout_s, head_only
        self.started = False

    async def send(self, status: int, content_type: str, body: bytes,
                   headers: tuple[tuple[str, str], ...] = ()) -> None:
        await self.start(status, content_type, headers + (("content-length", str(len(body))),))
        await self.write(body)
        await self.end()

    async def start(self, status: int, content_type: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """Without a content-length h11 frames the body as chunks (HTTP/1.1) or by closing (HTTP/1.0)."""
        self.started = True
        await self._put(h11.Response(status_code=status, headers=[("content-type", content_type), *headers]))

    async def write(self, data: bytes) -> None:
        if data and not self._head_only:
            await self._put(h11.Data(data=data))

    async def end(self) -> None:
        await self._put(h11.EndOfMessage())

    async def _put(self, event) -> None:
        if self.writer.is_closing():
            raise ClientGone("the client closed the connection")
        self.writer.write(self._conn.send(event))
        if not self.writer.transport.get_write_buffer_size():
            return  # the socket took it all (almost every write on loopback): no drain, no timer to arm
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await self.writer.drain()  # back-pressure: a slow reader slows its own stream only
        except TimeoutError:
            self.writer.transport.abort()  # what it has not read is dropped with it
            raise ClientGone(f"the client read nothing for {self._send_timeout_s:g}s") from None
        except ConnectionError as exc:
            raise ClientGone(str(exc)) from None


Handler = Callable[[HttpRequest, Exchange], Awaitable[None]]
# (status, message) -> the body of an error answer the server gives by itself (bad HTTP, 408, 413, 503), as JSON.
ErrorBody = Callable[[int, str], bytes]


class HttpServer:
    """The listening sockets and their connections, all under one HttpLimits; close() ends both."""

    def __init__(self, handler: Handler, error_body: ErrorBody, limits: HttpLimits) -> None:
        self._handler, self._error_body, self._limits = handler, error_body, limits
        self._connections: set[asyncio.Task] = set()
        self._servers: list[asyncio.Server] = []

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listens on one more address (port 0: any free one) and returns the port; raises OSError when it cannot
        bind. A TLS handshake gets the head's deadline: it comes before the head and is as cheap to dribble."""
        handshake_s = self._limits.head_timeout_s if ssl_context else None
        server = await asyncio.start_server(self._connection, host.strip("[]"), port, ssl=ssl_context,
                                            ssl_handshake_timeout=handshake_s)
        self._servers.append(server)
        return server.sockets[0].getsockname()[1]

    def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._limits.max_connections:
            return await self._turn_away(reader, writer)
        task = asyncio.current_task()
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self._limits.max_head_bytes)
        try:
            while await self._one_exchange(conn, reader, writer):
                conn.start_next_cycle()
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, reader, writer, exc.error_status_hint, self._protocol_error(exc))
        except _Expired as exc:
            if exc.status is not None:
                await self._refuse(conn, reader, writer, exc.status, exc.message)
        except (ClientGone, ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # a client that leaves, stops reading or breaks TLS just loses its connection
        except asyncio.CancelledError:
            pass  # close(): the task ends here, or asyncio's stream callback (3.11) logs the cancel as an error
        finally:
            self._connections.discard(task)
            writer.close()

    async def _one_exchange(self, conn: h11.Connection, reader, writer) -> bool:
        """Reads one request and answers it; True while the connection may carry another."""
        event = await self._head(conn, reader)
        if isinstance(event, h11.ConnectionClosed):
            return False
        assert isinstance(event, h11.Request), event
        length = dict(event.headers).get(b"content-length")
        if length is not None and int(length) > self._limits.max_body_bytes:
            await self._refuse(conn, reader, writer, 413, self._too_large())
            return False
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = await self._body(conn, reader)
        if body is None:
            await self._refuse(conn, reader, writer, 413, self._too_large())
            return False
        method, target = event.method.decode("latin-1"), event.target.decode("latin-1")
        request = HttpRequest(method=method, path=target.partition("?")[0],
                              headers={k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}, body=body)
        exchange = Exchange(conn, writer, self._limits.send_timeout_s, head_only=method == "HEAD")
        if not await self._handle_watching(request, exchange, conn, reader):
            return False
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _head(self, conn: h11.Connection, reader: asyncio.StreamReader):
        """The next request's head, or ConnectionClosed. Two deadlines, neither restarted by bytes that trickle in:
        idle_timeout for the first byte (closed without an answer: nobody asked anything), then head_timeout from it
        to the end of the headers (408), so a client sending a byte a second holds its connection head_timeout long."""
        loop = asyncio.get_running_loop()
        received = len(conn.trailing_data[0])  # a pipelined request, read while the last one was answered
        deadline = loop.time() + (self._limits.head_timeout_s if received else self._limits.idle_timeout_s)
        while (event := conn.next_event()) is h11.NEED_DATA:
            expired = _Expired(408, f"request head (request line and headers) not received within "
                                    f"{self._limits.head_timeout_s:g}s") if received else _Expired(None)
            data = await _read_by(reader, deadline, expired)
            if data and not received:
                deadline = loop.time() + self._limits.head_timeout_s
            received += len(data)
            conn.receive_data(data)
        if isinstance(event, h11.Request) and received - len(conn.trailing_data[0]) > self._limits.max_head_bytes:
            # h11 checks the size of a head still incomplete; one that arrives whole in a read is checked here
            raise h11.RemoteProtocolError("request head too long", error_status_hint=431)
        return event

    async def _body(self, conn: h11.Connection, reader: asyncio.StreamReader) -> bytes | None:
        """The whole body within body_timeout, or None once it grows past the cap (a chunked upload has no length to
        check first)."""
        deadline = asyncio.get_running_loop().time() + self._limits.body_timeout_s
        expired = _Expired(408, f"body: not received within {self._limits.body_timeout_s:g}s")
        chunks, size = [], 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await _read_by(reader, deadline, expired))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone("the client closed the connection mid-request")
            else:
                size += len(event.data)
                if size > self._limits.max_body_bytes:
                    return None
                chunks.append(event.data)

    async def _handle_watching(self, request: HttpRequest, exchange: Exchange, conn: h11.Connection, reader) -> bool:
        """Runs the handler while watching the socket: a client that closes cancels the handler (and so its
        generation), as a cancelled gRPC call does. False when the client left."""
        handling = asyncio.create_task(self._handler(request, exchange))
        watching = asyncio.create_task(_until_closed(conn, reader, self._limits.max_head_bytes))
        try:
            done, _ = await asyncio.wait({handling, watching}, return_when=asyncio.FIRST_COMPLETED)
            if handling not in done and not _client_left(watching):
                await asyncio.wait({handling})  # it stopped reading a client piling up requests: finish this one
        finally:
            for task in (handling, watching):
                task.cancel()
            await asyncio.wait({handling, watching})
        if not handling.cancelled() and (exc := handling.exception()) is not None:
            if isinstance(exc, ClientGone):
                return False
            log.error("HTTP %s %s failed", request.method, request.path, exc_info=exc)
            if not exchange.started:
                await self._refuse(conn, reader, exchange.writer, 500,
                                   f"mpsd failed to answer: {type(exc).__name__}: {exc}")
            return False
        return not _client_left(watching)

    def _too_large(self) -> str:
        return f"body: over the limit of {self._limits.max_body_bytes} bytes"

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> str:
        if exc.error_status_hint == 431:  # h11's words for it are "Receive buffer too long"
            return f"request head (request line and headers) over the limit of {self._limits.max_head_bytes} bytes"
        return f"bad HTTP request: {exc}"

    async def _refuse(self, conn: h11.Connection, reader, writer, status: int, message: str) -> None:
        """An answer the server gives by itself; then the connection closes once the client has read it."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        exchange = Exchange(conn, writer, self._limits.send_timeout_s)
        with contextlib.suppress(ClientGone, h11.LocalProtocolError):
            await exchange.send(status, "application/json", self._error_body(status, message),
                                (("connection", "close"),))
            await _linger(reader, writer, LINGER_MAX_BYTES)

    async def _turn_away(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Past max_connections: 503 at once, before any of the request is read, never queued behind the others,
        so the client learns now that it may retry or go elsewhere. Written by hand: h11 answers only requests."""
        body = self._error_body(503, f"mpsd is at its limit of {self._limits.max_connections} HTTP connections: "
                                     f"try again shortly")
        head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"retry-after: 1\r\nconnection: close\r\n\r\n")
        try:
            writer.write(head.encode("latin-1") + body)
            async with asyncio.timeout(self._limits.send_timeout_s):
                await writer.drain()
            await _linger(reader, writer, self._limits.max_head_bytes)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def _read_by(reader: asyncio.StreamReader, deadline: float, expired: _Expired) -> bytes:
    try:
        async with asyncio.timeout_at(deadline):
            return await reader.read(READ_CHUNK_BYTES)
    except TimeoutError:
        raise expired from None


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, max_bytes: int) -> None:
    """Reads and drops what the client still sends (the rest of a refused body) before closing: closing a socket
    with unread input makes the kernel send a reset, which can destroy the answer before the client reads it."""
    if writer.can_write_eof():
        writer.write_eof()  # the client sees the answer end; TLS cannot half-close, and its framing says the same
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(LINGER_S):
            for _ in range(max(1, max_bytes // READ_CHUNK_BYTES)):
                if not await reader.read(READ_CHUNK_BYTES):
                    return


def _client_left(watching: asyncio.Task) -> bool:
    if not watching.done() or watching.cancelled():
        return False
    return watching.exception() is not None or watching.result()


async def _until_closed(conn: h11.Connection, reader: asyncio.StreamReader, max_head_bytes: int) -> bool:
    """Returns True once the client closes; bytes it sends meanwhile (a pipelined request) wait in h11."""
    while True:
        data = await reader.read(READ_CHUNK_BYTES)
        if not data:
            return True
        conn.receive_data(data)
        if len(conn.trailing_data[0]) > max_head_bytes:
            return False  # a client piling up requests: stop reading; TCP holds back the rest
