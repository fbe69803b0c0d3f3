"""The daemon's HTTP/1.1 server (h11 on asyncio) against raw sockets: keep-alive, the body cap, bad HTTP,
streaming, and a client that leaves cancelling its handler."""

import asyncio
import json

import pytest
from mpsd.supervisor.edge.http.server import Exchange, HttpRequest, HttpServer

CAP = 1000


def error_body(status: int, message: str) -> bytes:
    return json.dumps({"status": status, "message": message}).encode()


class App:
    """Echoes requests; /stream sends three pieces; /hang waits until cancelled; /boom raises."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.hanging = asyncio.Event()

    async def handle(self, request: HttpRequest, exchange: Exchange) -> None:
        if request.path == "/stream":
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


async def serving(app: App):
    server = HttpServer(app.handle, error_body, CAP)
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


def run(test):
    async def main():
        app = App()
        server, port = await serving(app)
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

