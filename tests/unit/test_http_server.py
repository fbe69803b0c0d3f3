"""The daemon's HTTP/1.1 server (h11 on asyncio) against raw sockets on 127.0.0.1: keep-alive, its limits (the
deadlines of the idle wait, the head, the body and each write; the connection cap; the body and head caps), bad HTTP,
streaming, HEAD, and a client that leaves cancelling its handler."""

import asyncio
import json
import socket
import time

import pytest
from mpsd.config import HttpLimits
from mpsd.supervisor.edge.http.server import ClientGone, Exchange, HttpRequest, HttpServer

CAP = 1000


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"status": status, "message": message}).encode()


class App:
    """Echoes requests; /stream sends three pieces; /hang waits until cancelled; /boom raises; /flood writes
    without end, to a client that may stop reading."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.hanging = asyncio.Event()
        self.flood_cut = asyncio.Event()

    async def handle(self, request: HttpRequest, exchange: Exchange) -> None:
        if request.path == "/flood":
            await exchange.start(200, "application/octet-stream")
            try:
                while True:
                    await exchange.write(b"x" * (1 << 20))
            except ClientGone:
                self.flood_cut.set()
                raise
        elif request.path == "/stream":
            await exchange.start(200, "text/event-stream")
            for piece in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
                await exchange.write(piece)
            await exchange.end()
        elif request.path == "/hang":
            self.hanging.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        elif request.path == "/boom":
            raise RuntimeError("a bug")
        else:
            echo = {"method": request.method, "path": request.path, "body": request.body.decode(),
                    "auth": request.headers.get("authorization")}
            await exchange.send(200, "application/json", json.dumps(echo).encode())


async def serving(app: App, **limits):
    server = HttpServer(app.handle, error_body, HttpLimits(max_body_bytes=CAP, **limits))
    port = await server.start("127.0.0.1", 0)
    return server, port


async def exchange_raw(port: int, data: bytes) -> bytes:
    """Sends bytes and reads until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def post(path: str, body: bytes, extra: str = "", close: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{extra}"
    return (head + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def run(test, **limits):
    async def main():
        app = App()
        server, port = await serving(app, **limits)
        try:
            await test(app, port)
        finally:
            server.close()
    asyncio.run(main())


def test_one_connection_carries_several_requests_and_closes_when_asked():
    async def test(app, port):
        answer = await exchange_raw(port, post("/a?x=1", b"one", "Authorization: Bearer t\r\n") + post("/b", b"two", close=True))
        assert answer.count(b"HTTP/1.1 200 ") == 2
        assert b'"path": "/a", "body": "one", "auth": "Bearer t"' in answer and b'"body": "two"' in answer
    run(test)


def test_a_declared_body_over_the_cap_gets_413_before_it_is_read():
    async def test(app, port):
        answer = await exchange_raw(port, f"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {CAP + 1}\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 413 ") and b"connection: close" in answer.lower()
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"status": 413, "message": f"body: over the limit of {CAP} bytes"}
    run(test)


def test_a_chunked_body_growing_over_the_cap_gets_413():
    async def test(app, port):
        chunk = b"%x\r\n%s\r\n" % (600, b"x" * 600)
        answer = await exchange_raw(port, b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 2)
        assert answer.startswith(b"HTTP/1.1 413 ")
    run(test)


def test_a_client_waiting_for_100_continue_is_told_to_go_on():
    async def test(app, port):
        answer = await exchange_raw(port, post("/a", b"hello", "Expect: 100-continue\r\n", close=True))
        assert answer.startswith(b"HTTP/1.1 100 ") and b"HTTP/1.1 200 " in answer and b'"body": "hello"' in answer
    run(test)


@pytest.mark.parametrize("request_, status, says", [
    (b"NOT HTTP AT ALL\r\n\r\n", b"400", b"bad HTTP request"),
    (b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n", b"500", b"RuntimeError: a bug"),  # a handler that raises
], ids=["malformed", "handler-raises"])
def test_a_request_that_cannot_be_answered_gets_an_error_and_the_server_keeps_serving(request_, status, says):
    async def test(app, port):
        answer = await exchange_raw(port, request_)
        assert answer.startswith(b"HTTP/1.1 " + status + b" ") and says in answer
        assert (await exchange_raw(port, post("/a", b"ok", close=True))).startswith(b"HTTP/1.1 200 ")
    run(test)


def test_a_streamed_answer_goes_out_in_chunks():
    async def test(app, port):
        answer = await exchange_raw(port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        head, body = answer.split(b"\r\n\r\n", 1)
        assert b"transfer-encoding: chunked" in head.lower()
        assert body == b"9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    run(test)


def test_a_client_that_leaves_cancels_its_handler():
    async def test(app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(app.hanging.wait(), 10)
        writer.close()
        await asyncio.wait_for(app.cancelled.wait(), 10)
    run(test)



def status_and_body(answer: bytes) -> tuple[bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split()[1], json.loads(body)


def test_a_dribbled_head_meets_its_deadline_however_often_bytes_come():
    """A slowloris client sends a byte every 50 ms: were each byte to restart a read timeout, it would hold the
    connection for ever; the head's own deadline answers 408 and closes once it passes."""
    async def test(app, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def dribble():
            for byte in b"GET / HTTP/1.1\r\nX-Slow: " + b"z" * 1000:
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

        sending = asyncio.create_task(dribble())
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)
        took = time.monotonic() - started
        sending.cancel()
        writer.close()
        status, body = status_and_body(answer)
        assert status == b"408" and "not received within 0.6s" in body["message"]
        assert 0.5 < took < 3, f"the head's deadline passed after {took:.2f}s"
    run(test, head_timeout_s=0.6, idle_timeout_s=30)


def test_an_idle_connection_is_closed_without_an_answer_new_or_kept_alive():
    async def test(app, port):
        started = time.monotonic()
        assert await exchange_raw(port, b"") == b""  # nothing asked: nothing answered
        kept = await exchange_raw(port, post("/a", b"one"))  # answered, then idle on keep-alive
        assert kept.count(b"HTTP/1.1 200 ") == 1 and kept.endswith(b'"auth": null}')
        assert time.monotonic() - started < 5
    run(test, idle_timeout_s=0.3)


def test_a_body_that_does_not_arrive_in_time_gets_408():
    async def test(app, port):
        started = time.monotonic()
        answer = await exchange_raw(port, b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        status, body = status_and_body(answer)
        assert status == b"408" and body["message"] == "body: not received within 0.5s"
        assert time.monotonic() - started < 3
    run(test, body_timeout_s=0.5)


def test_a_head_over_64_kib_gets_431_with_a_sentence():
    async def test(app, port):
        answer = await exchange_raw(port, b"GET /a HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"y" * 70_000 + b"\r\n\r\n")
        status, body = status_and_body(answer)
        assert status == b"431" and body["message"] == ("request head (request line and headers) over the limit of "
                                                        "65536 bytes")
    run(test)


async def request_on(reader, writer, path: str = "/a") -> bytes:
    """One keep-alive request on an open connection: its answer's head (the echo body is small and read with it)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return await asyncio.wait_for(reader.read(65536), 10)


def test_a_connection_past_the_cap_gets_503_at_once_and_a_freed_slot_serves_again():
    async def test(app, port):
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        for reader, writer in held:
            assert (await request_on(reader, writer)).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        answer = await exchange_raw(port, b"")  # turned away before it sends a byte: never queued
        head = answer.partition(b"\r\n\r\n")[0].lower()
        status, body = status_and_body(answer)
        assert status == b"503" and b"connection: close" in head and "limit of 2 HTTP connections" in body["message"]
        assert time.monotonic() - started < 3
        held.pop()[1].close()

        async def served() -> bool:
            return (await exchange_raw(port, post("/a", b"", close=True))).startswith(b"HTTP/1.1 200 ")

        deadline = time.monotonic() + 10
        while not await served():
            assert time.monotonic() < deadline, "the freed slot never served"
            await asyncio.sleep(0.05)
        held[0][1].close()
    run(test, max_connections=2)


def test_a_reader_that_stalls_is_cut_after_the_send_timeout_while_another_stream_completes():
    async def test(app, port):
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(("127.0.0.1", port))
        stalled.sendall(b"GET /flood HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads a byte
        try:
            streamed = await exchange_raw(port, b"GET /stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert streamed.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            started = time.monotonic()
            await asyncio.wait_for(app.flood_cut.wait(), 10)
            assert time.monotonic() - started < 5
        finally:
            stalled.close()
    run(test, send_timeout_s=0.5)


def test_head_gets_the_head_of_the_get_answer_and_the_connection_goes_on():
    async def test(app, port):
        answer = await exchange_raw(port, b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n" + post("/b", b"two", close=True))
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 200 ") and b"content-length: " in first.lower()
        assert rest.startswith(b"HTTP/1.1 200 ") and b'"body": "two"' in rest
    run(test)
