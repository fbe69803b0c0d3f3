"""HTTP that survives bad clients (issue 21, item 4), against one real daemon over raw sockets.

Each test plays one bad client (slowloris heads and bodies, hundreds of idle
connections, a 1 GiB body, malformed requests, undecodable bodies, a client
that leaves mid-stream or stops reading) while a bystander streams normal
completions on its own keep-alive connection; every one of the bystander's
streams must end with all its tokens. The limits are short in this daemon's
config so that each deadline is measured, not waited for at its default: what
each test measured is printed (pytest -s). The last test checks the daemon's
memory after all of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import selectors
import socket
import threading
import time
import urllib.parse
from typing import Self

import psutil
import pytest
from support import Daemon, metric, running_daemon, wait_for

IDLE_S, HEAD_S, BODY_S, SEND_S = 4.0, 2.0, 3.0, 3.0
MAX_BODY_BYTES = 1 << 20
SLACK_S = 1.0             # past a deadline, how late its close may come on two busy cores
IDLE_CONNECTIONS = 500
RSS_GROWTH_BYTES = 20 << 20
CONFIG = f"""
[daemon]
health_interval = "0.5s"
http_idle_timeout = "{IDLE_S:g}s"
http_head_timeout = "{HEAD_S:g}s"
http_body_timeout = "{BODY_S:g}s"
http_send_timeout = "{SEND_S:g}s"
http_max_connections = 600
http_max_body = "1MiB"

[[models]]
name = "null"
backend = "null-lm"

[[models]]
name = "target"
backend = "null-lm"
"""
CANCELLED_TARGET = {"model": "target", "method": "Generate", "protocol": "http", "code": "CANCELLED"}
LONG_STREAM = {"model": "target", "prompt": "The", "max_tokens": 500_000, "stream": True}


@dataclasses.dataclass(frozen=True)
class Edge:
    daemon: Daemon
    host: str
    port: int
    baseline_rss_bytes: int   # the daemon's, once warm and before any bad client


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("bad-clients"), CONFIG, 2) as daemon:
        url = urllib.parse.urlsplit(daemon.http_url)
        warm = Edge(daemon, url.hostname, url.port, 0)
        with Bystander(warm) as bystander:  # warm every path the tests take once, so imports are not counted
            wait_for(lambda: bystander.completed >= 3 or bystander.failures, 30, "three warm-up streams")
            post(warm, "/v1/completions", b"{")
            metric(daemon, "mpsd_requests_total")
            daemon.status()
        bystander.assert_unharmed()
        yield dataclasses.replace(warm, baseline_rss_bytes=psutil.Process(daemon.process.pid).memory_info().rss)


class Bystander:
    """A well-behaved client: streamed completions back to back on one keep-alive connection, on its own thread,
    from before an attack until after it. Each must end 200 with every token asked for, and none may stall."""

    MAX_TOKENS = 64
    STALL_S = 5.0  # one 64-token null-lm stream takes milliseconds; this long means the edge was starved

    def __init__(self, edge: Edge, model: str = "null") -> None:
        self._edge, self._model = edge, model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.completed = 0
        self.failures: list[str] = []
        self.longest_s = 0.0

    def __enter__(self) -> Self:
        self._thread.start()
        wait_for(lambda: self.completed or self.failures, 30, "the bystander's first stream")
        return self

    def __exit__(self, *exc_info) -> None:
        """One more stream must end after the attack: the one running as it ended (streams run back to back)."""
        after = self.completed + 1
        with contextlib.suppress(AssertionError):  # assert_unharmed says what went wrong
            wait_for(lambda: self.completed >= after or self.failures, self.STALL_S * 2, "a stream after the attack")
        self._stop.set()
        self._thread.join(self.STALL_S * 4)

    def _run(self) -> None:
        conn = http.client.HTTPConnection(self._edge.host, self._edge.port, timeout=self.STALL_S * 3)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    self._one_stream(conn)
                except (OSError, http.client.HTTPException, AssertionError, ValueError) as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                    return
                self.longest_s = max(self.longest_s, time.monotonic() - started)
                self.completed += 1
                self._stop.wait(0.05)  # leave the cores to the attack and the daemon
        finally:
            conn.close()

    def _one_stream(self, conn: http.client.HTTPConnection) -> None:
        body = {"model": self._model, "prompt": "The", "max_tokens": self.MAX_TOKENS, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, f"status {response.status}: {response.read()[:300]!r}"
        texts, usage, finish, done = [], None, None, False
        for line in response:
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[len(b"data: "):])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                texts.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
        words = len("".join(texts).split())
        assert done and finish == "length" and words == self.MAX_TOKENS and usage["completion_tokens"] == words, \
            f"stream ended done={done} finish={finish} words={words} usage={usage}"

    def assert_unharmed(self) -> None:
        assert not self._thread.is_alive(), f"the bystander's stream hung ({self.summary()})"
        assert not self.failures, f"the bystander's stream failed: {self.failures}"
        assert self.completed >= 2, self.summary()
        assert self.longest_s < self.STALL_S, f"a bystander stream took {self.longest_s:.2f}s"

    def summary(self) -> str:
        return f"bystander: {self.completed} streams of {self.MAX_TOKENS} tokens, longest {self.longest_s:.2f}s"


def report(line: str) -> None:
    print(f"\n[bad clients] {line}", flush=True)


# --- raw sockets ---------------------------------------------------------------------------------------------------

def open_socket(edge: Edge, receive_buffer_bytes: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if receive_buffer_bytes:  # before connect, so the window the daemon sees is small from the start
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
        sock.settimeout(10)
        sock.connect((edge.host, edge.port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.contextmanager
def sockets(count: int, edge: Edge, **options):
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            opened.append(open_socket(edge, **options))
        yield opened
    finally:
        for sock in opened:
            sock.close()


def read_until_closed(sock: socket.socket, timeout: float, max_bytes: int = 4 << 20) -> tuple[bytes, str]:
    """What the daemon sends until it closes the connection, and how it ended: "eof", "reset", or "open" when it
    was still open at the deadline (or past max_bytes)."""
    deadline, chunks, size = time.monotonic() + timeout, [], 0
    while (left := deadline - time.monotonic()) > 0 and size < max_bytes:
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)
        size += len(data)
    return b"".join(chunks), "open"


def parse_response(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    assert len(parts) >= 2 and parts[0].startswith("HTTP/1.") and parts[1].isdigit(), f"not a response: {data[:200]!r}"
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(parts[1]), headers, body


def read_one_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """One response framed by Content-Length, leaving the connection open for the next request."""
    deadline, data = time.monotonic() + timeout, b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-response: {data[:200]!r}"
        data += chunk
    return parse_response(data)


def _length(data: bytes) -> int:
    return int(parse_response(data)[1].get("content-length", "0"))


def refusal(data: bytes) -> tuple[int, str]:
    """(status, the OpenAI-style error's message) of a JSON error answer."""
    status, headers, body = parse_response(data)
    assert headers.get("content-type", "").startswith("application/json"), headers
    answer = json.loads(body)
    assert set(answer["error"]) >= {"message", "type", "param", "code"}, answer
    return status, answer["error"]["message"]


def post(edge: Edge, path: str, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(edge.host, edge.port, timeout=30)
    try:
        conn.request("POST", path, body, {"content-type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def get_models(edge: Edge) -> int:
    """A fresh normal request, on a connection of its own."""
    conn = http.client.HTTPConnection(edge.host, edge.port, timeout=30)
    try:
        conn.request("GET", "/v1/models")
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def dribble(socks: list[socket.socket], payload: bytes, limit_s: float) -> list[tuple[float, bytes, str]]:
    """Sends `payload` to every socket one byte a second (the deliberate slowloris pace) until each is answered or
    closed, or limit_s passes. Per socket: (seconds from its first dribbled byte, what it got, how it ended)."""
    assert len(payload) > limit_s + 1, "the payload must outlast the limit"
    outcome: dict[socket.socket, tuple[float, bytes, str]] = {}
    selector = selectors.DefaultSelector()
    started = time.monotonic()
    try:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        for index in range(len(payload)):
            if len(outcome) == len(socks) or time.monotonic() - started > limit_s:
                break
            for sock in socks:
                if sock not in outcome:
                    try:
                        sock.send(payload[index:index + 1])
                    except OSError:
                        outcome[sock] = (time.monotonic() - started, b"", "reset on send")
                        selector.unregister(sock)
            tick = started + index + 1
            while (left := tick - time.monotonic()) > 0 and len(outcome) < len(socks):
                for key, _ in selector.select(left):
                    ended_at = time.monotonic() - started
                    data, how = read_until_closed(key.fileobj, 2.0)
                    outcome[key.fileobj] = (ended_at, data, how)
                    selector.unregister(key.fileobj)
    finally:
        selector.close()
    return [outcome.get(sock, (time.monotonic() - started, b"", "open")) for sock in socks]


def span(seconds: list[float]) -> str:
    return f"{min(seconds):.2f}-{max(seconds):.2f} s"


# --- the bad clients -----------------------------------------------------------------------------------------------

def test_slowloris_heads_are_cut_at_the_head_deadline_that_dribbled_bytes_do_not_restart(edge):
    """Eight connections send a request head a byte a second, two of them after a first request on a keep-alive
    connection: each gets 408 (or is closed) HEAD_S after its first byte, not IDLE_S and not never."""
    fresh, kept = 6, 2
    head = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 64
    with Bystander(edge) as bystander, sockets(fresh + kept, edge) as socks:
        for sock in socks[fresh:]:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_one_response(sock)[0] == 200
        outcomes = dribble(socks, head, HEAD_S + 8)
    bystander.assert_unharmed()
    for ended_at, data, how in outcomes:
        assert how in ("eof", "reset", "reset on send"), f"still open after {ended_at:.1f}s: {outcomes}"
        if data:
            status, message = refusal(data)
            assert status == 408 and "head" in message, (status, message)
        assert HEAD_S - 0.1 <= ended_at <= HEAD_S + SLACK_S, f"cut after {ended_at:.2f}s, not {HEAD_S:g}s: {outcomes}"
    answered = sum(bool(data) for _, data, _ in outcomes)
    report(f"slowloris: {len(outcomes)} connections ({kept} keep-alive) cut after {span([o[0] for o in outcomes])} "
           f"(head timeout {HEAD_S:g}s), {answered} with 408; {bystander.summary()}")


def test_a_body_dribbled_a_byte_a_second_gets_408_at_the_body_deadline(edge):
    body_bytes = 64
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_bytes}\r\n\r\n").encode()
    with Bystander(edge) as bystander, sockets(4, edge) as socks:
        for sock in socks:
            sock.sendall(head)
        outcomes = dribble(socks, b"x" * body_bytes, BODY_S + 8)
    bystander.assert_unharmed()
    for ended_at, data, how in outcomes:
        assert how in ("eof", "reset", "reset on send") and data, f"not answered: {outcomes}"
        status, message = refusal(data)
        assert status == 408 and "body" in message, (status, message)
        assert BODY_S - 0.1 <= ended_at <= BODY_S + SLACK_S, f"cut after {ended_at:.2f}s, not {BODY_S:g}s"
    report(f"slow body: {len(outcomes)} connections got 408 after {span([o[0] for o in outcomes])} "
           f"(body timeout {BODY_S:g}s); {bystander.summary()}")


def test_hundreds_of_idle_connections_are_closed_at_the_idle_deadline_while_others_are_served(edge):
    """500 connections that send nothing, and 5 that go quiet after one request: each closed IDLE_S after it
    opened (or after its answer), with no answer owed; meanwhile a fresh connection's request is answered."""
    with Bystander(edge) as bystander, contextlib.ExitStack() as stack:
        quiet, answered_at = [], []
        for _ in range(5):
            quiet.append(stack.enter_context(contextlib.closing(open_socket(edge))))
            quiet[-1].sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_one_response(quiet[-1])[0] == 200
            answered_at.append(time.monotonic())
        idle, connected_at = [], []
        for _ in range(IDLE_CONNECTIONS):
            idle.append(stack.enter_context(contextlib.closing(open_socket(edge))))
            connected_at.append(time.monotonic())
        asked_at = time.monotonic()
        assert get_models(edge) == 200, f"a normal request was refused while {IDLE_CONNECTIONS} connections sat idle"
        answered_s = time.monotonic() - asked_at
        closed_at = wait_closed(idle + quiet, IDLE_S + SLACK_S * 3)
    bystander.assert_unharmed()
    still_open = sum(at is None for at in closed_at)
    assert not still_open, f"{still_open} of {len(closed_at)} connections still open {IDLE_S + SLACK_S * 3:g}s on"
    idle_s = [closed - opened for closed, opened in zip(closed_at, connected_at)]
    quiet_s = [closed - answered for closed, answered in zip(closed_at[IDLE_CONNECTIONS:], answered_at)]
    for what, seconds in (("idle", idle_s), ("quiet keep-alive", quiet_s)):
        assert IDLE_S - 0.1 <= min(seconds) and max(seconds) <= IDLE_S + SLACK_S * 2, \
            f"{what} connections closed after {span(seconds)}, not {IDLE_S:g}s"
    report(f"idle: {IDLE_CONNECTIONS} connections (opened in {connected_at[-1] - connected_at[0]:.2f} s) each closed "
           f"{span(idle_s)} after it opened, {len(quiet)} quiet keep-alive ones {span(quiet_s)} after their answer "
           f"(idle timeout {IDLE_S:g}s); a fresh request meanwhile answered 200 in {answered_s * 1000:.0f} ms; "
           f"{bystander.summary()}")


def wait_closed(socks: list[socket.socket], timeout: float) -> list[float | None]:
    """When each socket was closed by the daemon (EOF or reset, with no answer: nothing was asked), or None."""
    closed_at: dict[socket.socket, float] = {}
    selector = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout
    try:
        for sock in socks:
            selector.register(sock, selectors.EVENT_READ)
        while len(closed_at) < len(socks) and (left := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(left):
                now = time.monotonic()
                try:
                    data = key.fileobj.recv(65536)
                except ConnectionResetError:
                    data = b""
                assert not data, f"an idle connection was sent {data[:200]!r}"
                closed_at[key.fileobj] = now
                selector.unregister(key.fileobj)
    finally:
        selector.close()
    return [closed_at.get(sock) for sock in socks]


@pytest.mark.parametrize("expect_continue", [False, True], ids=["plain", "expect-100-continue"])
def test_a_1_gib_content_length_gets_413_before_the_body_is_read(edge, expect_continue):
    head = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {1 << 30}\r\n" + ("Expect: 100-continue\r\n" if expect_continue else "") + "\r\n")
    with Bystander(edge) as bystander, sockets(1, edge) as (sock,):
        started = time.monotonic()
        sock.sendall(head.encode() + (b"" if expect_continue else b'{"prompt": "' + b"a" * 4096))
        data, how = read_until_closed(sock, BODY_S + 5)
        elapsed = time.monotonic() - started
    bystander.assert_unharmed()
    assert not data.startswith(b"HTTP/1.1 100"), "a body over the cap was invited with 100 Continue"
    status, message = refusal(data)
    assert status == 413 and "body" in message and str(MAX_BODY_BYTES) in message, (status, message)
    assert how in ("eof", "reset"), f"the connection stayed open after the 413 ({how})"
    assert elapsed < 1.0, f"the 413 took {elapsed:.2f}s: it waited for the body"
    report(f"1 GiB Content-Length ({'100-continue' if expect_continue else '4 KiB sent'}): 413 and closed "
           f"in {elapsed * 1000:.0f} ms; {bystander.summary()}")


def test_a_chunked_body_that_grows_past_the_cap_gets_413(edge):
    piece = b"a" * (64 << 10)
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    sent, most = 0, MAX_BODY_BYTES * 16
    with Bystander(edge) as bystander, sockets(1, edge) as (sock,):
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            while sent < most and not selector.select(0):
                try:
                    sock.sendall(chunk)
                except OSError:
                    break
                sent += len(piece)
        data, how = read_until_closed(sock, 5)
    bystander.assert_unharmed()
    assert sent < most, f"{sent} bytes of chunks taken with no answer: the cap of {MAX_BODY_BYTES} never applied"
    assert sent > MAX_BODY_BYTES, f"refused after {sent} bytes, under the cap of {MAX_BODY_BYTES}"
    status, message = refusal(data)
    assert status == 413 and "body" in message, (status, message)
    assert how in ("eof", "reset"), f"the connection stayed open after the 413 ({how})"
    report(f"chunked body: 413 after {sent / (1 << 20):.2f} MiB sent (cap 1 MiB), connection closed; "
           f"{bystander.summary()}")


@pytest.mark.parametrize("over", [0, 1], ids=["at-the-cap", "one-byte-over"])
def test_the_body_cap_is_exact(edge, over):
    body = b"x" * (MAX_BODY_BYTES + over)  # not JSON: a body that was read is refused as such
    with sockets(1, edge) as (sock,):
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data, _ = read_until_closed(sock, 10)
    status, message = refusal(data)
    assert (status, message.startswith("body:")) == ((413, True) if over else (400, True)), (status, message)
    assert ("limit" in message) == bool(over) and ("JSON" in message) != bool(over), message


MALFORMED = {
    "garbage": b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n",
    "missing-version": b"GET /v1/models\r\nHost: 127.0.0.1\r\n\r\n",
    "absurd-header-name": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\x01(name): x\r\n\r\n",
    "header-without-colon": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nNoColonOnThisLine\r\n\r\n",
    "bad-content-length": b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: lots\r\n\r\n",
    "two-content-lengths": b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                           b"Content-Length: 7\r\n\r\n{}",
    "no-host": b"GET /v1/models HTTP/1.1\r\n\r\n",
    "100-kib-header": b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * (100 << 10) + b"\r\n\r\n",
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_requests_get_a_4xx_at_once_and_close(edge, name):
    with Bystander(edge) as bystander, sockets(1, edge) as (sock,):
        started = time.monotonic()
        sock.sendall(MALFORMED[name])
        data, how = read_until_closed(sock, HEAD_S + 5)
        elapsed = time.monotonic() - started
    bystander.assert_unharmed()
    status, message = refusal(data)
    if name == "100-kib-header":
        assert status in (400, 413, 431) and "head" in message, (status, message)
    else:
        assert status == 400, (status, message)
    assert how in ("eof", "reset"), f"the connection stayed open after the {status} ({how})"
    assert elapsed < HEAD_S / 2, f"answered after {elapsed:.2f}s: it waited for a deadline"
    report(f"malformed {name}: {status} and closed in {elapsed * 1000:.0f} ms ({message[:80]!r})")


BAD_BODIES = [
    ("/v1/chat/completions", b'{"model": "null", "messages": [{"role": "user", "content": "caf\xc3\x28"}]}', "body"),
    ("/v1/completions", b'{"model": "null", "prompt": "\xff\xfe the"}', "body"),
    ("/v1/chat/completions", b'{"model": "null", "messages": [{"role": "user", "content": "hi"', "body"),
    ("/v1/completions", b'{"model": "null", "prompt": "The", }', "body"),
    ("/v1/completions", b"model=null&prompt=The", "body"),
    ("/v1/chat/completions", b'["not", "an", "object"]', "body"),
    # JSON's \u escapes can spell a lone surrogate, which is no UTF-8 at all: the field it sits in is refused.
    ("/v1/completions", b'{"model": "null", "prompt": "\\ud800 the"}', "prompt"),
    ("/v1/chat/completions", b'{"model": "null", "messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
]


@pytest.mark.parametrize("path, body, named", BAD_BODIES,
                         ids=["chat-invalid-utf8", "completion-invalid-utf8", "chat-truncated-json",
                              "completion-trailing-comma", "completion-form-encoded", "chat-json-array",
                              "completion-lone-surrogate", "chat-lone-surrogate"])
def test_undecodable_bodies_get_400_naming_the_body_or_field(edge, path, body, named):
    with Bystander(edge) as bystander:
        status, answer = post(edge, path, body)
    bystander.assert_unharmed()
    error = answer.get("error", {})
    assert status == 400 and error.get("type") == "invalid_request_error", (status, answer)
    message, param = error.get("message", ""), error.get("param") or ""
    assert message.startswith(named) or param.startswith(named), f"names neither {named!r}: {answer}"
    assert get_models(edge) == 200
    report(f"undecodable body to {path}: 400 ({message[:90]!r}, param {error.get('param')!r})")


def test_a_client_that_leaves_mid_stream_ends_its_request_cancelled(edge):
    daemon = edge.daemon
    cancelled = metric(daemon, "mpsd_requests_total", **CANCELLED_TARGET)
    with Bystander(edge) as bystander:
        with sockets(1, edge) as (sock,):
            body = json.dumps(LONG_STREAM).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            received = b""
            deadline = time.monotonic() + 30
            while received.count(b"\ndata: ") < 5 and time.monotonic() < deadline:
                chunk = sock.recv(65536)
                assert chunk, f"the stream closed early: {received[:300]!r}"
                received += chunk
            events = received.count(b"\ndata: ")
            assert received.startswith(b"HTTP/1.1 200") and events >= 5, received[:300]
            left_at = time.monotonic()
        wait_for(lambda: metric(daemon, "mpsd_requests_total", **CANCELLED_TARGET) == cancelled + 1, 10,
                 "the request counted CANCELLED")
        cancelled_s = time.monotonic() - left_at
        idle_worker = wait_for(lambda: _target_idle(daemon), 10, "the target worker to run nothing")
        idle_s = time.monotonic() - left_at
        assert metric(daemon, "mpsd_inflight_requests", model="target") == 0
        assert get_models(edge) == 200
    bystander.assert_unharmed()
    report(f"mid-SSE disconnect after {events} events: counted CANCELLED "
           f"{cancelled_s * 1000:.0f} ms after the client left, worker {idle_worker['id']} back to inflight 0 and "
           f"running 0 sequences {idle_s:.2f} s after; "
           f"{bystander.summary()}")


def _target_idle(daemon: Daemon) -> dict | None:
    """The target model's worker once neither the daemon nor the worker itself (its last Stats) runs anything."""
    worker = next(w for w in daemon.status()["workers"] if w["model"] == "target")
    return worker if worker["inflight"] == 0 and worker["running_sequences"] == 0 else None


def test_a_client_that_stops_reading_is_cut_at_the_send_deadline(edge):
    """A stream to a client that reads nothing fills the socket buffers and stalls; SEND_S after the stall that
    connection is cut and its request ends (CANCELLED), while the bystander's stream goes on."""
    daemon = edge.daemon
    cancelled = metric(daemon, "mpsd_requests_total", **CANCELLED_TARGET)
    with Bystander(edge) as bystander, sockets(1, edge, receive_buffer_bytes=4096) as (sock,):
        body = json.dumps(LONG_STREAM).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        sent_at = time.monotonic()
        stalled_at, cut_at, tokens = watch_until_cut(daemon, cancelled, SEND_S + 30)
        data, how = read_until_closed(sock, 5, max_bytes=64 << 20)
        wait_for(lambda: _target_idle(daemon), 10, "the target worker to run nothing")
    bystander.assert_unharmed()
    stalled_s = cut_at - stalled_at
    assert SEND_S - 0.3 <= stalled_s <= SEND_S + SLACK_S, f"cut {stalled_s:.2f}s after its stream stalled, not {SEND_S:g}s"
    assert how in ("eof", "reset"), f"the connection was not closed ({how}, {len(data)} bytes read)"
    assert tokens < LONG_STREAM["max_tokens"], "the stream was not cut"
    report(f"slow reader: its stream stalled {stalled_at - sent_at:.2f} s in (buffers full after {tokens:.0f} tokens), "
           f"then was cut and counted CANCELLED {stalled_s:.2f} s later (send timeout {SEND_S:g}s); "
           f"{bystander.summary()}")


def watch_until_cut(daemon: Daemon, cancelled: float, timeout: float) -> tuple[float, float, float]:
    """Polls /metrics until the target's request ends CANCELLED: (when its token count last moved, when it was
    seen ended, the token count). The daemon counts a token as it goes out, so the count stops when writes stall."""
    deadline, tokens, moved_at = time.monotonic() + timeout, -1.0, time.monotonic()
    while time.monotonic() < deadline:
        now = time.monotonic()
        if metric(daemon, "mpsd_requests_total", **CANCELLED_TARGET) > cancelled:
            return moved_at, now, tokens
        if (count := metric(daemon, "mpsd_generated_tokens_total", model="target")) != tokens:
            tokens, moved_at = count, now
        time.sleep(0.1)
    raise AssertionError(f"the unread stream was not cut within {timeout:g}s ({tokens:.0f} tokens out)")


CAP_CONFIG = """
[daemon]
http_idle_timeout = "20s"
http_max_connections = 4

[[models]]
name = "null"
backend = "null-lm"
"""


def test_past_max_connections_a_connection_gets_503_at_once_and_the_slot_comes_back(tmp_path):
    """A daemon of its own with room for four connections: the bystander's and three idle ones. The fifth is
    answered 503 before it sends anything; once an idle one leaves, a new connection is served again."""
    with running_daemon(tmp_path / "cap", CAP_CONFIG, 1) as daemon:
        url = urllib.parse.urlsplit(daemon.http_url)
        small = Edge(daemon, url.hostname, url.port, 0)
        with Bystander(small) as bystander, sockets(3, small) as held:
            with sockets(1, small) as (extra,):
                started = time.monotonic()
                data, how = read_until_closed(extra, 5)
                refused_s = time.monotonic() - started
            for sock in held:  # still held, nothing said to them
                sock.setblocking(False)
                with pytest.raises(BlockingIOError):
                    sock.recv(1)
            held[0].close()
            served = wait_for(lambda: _served(small), 10, "a connection served once a slot was free")
        bystander.assert_unharmed()
    status, headers, _ = parse_response(data)
    status, message = refusal(data)
    assert status == 503 and "limit of 4" in message and headers.get("retry-after"), (status, headers, message)
    assert how in ("eof", "reset") and refused_s < 1.0, f"the 503 took {refused_s:.2f}s ({how})"
    report(f"connection cap 4: the 5th got 503 (retry-after {headers['retry-after']}) and was closed in "
           f"{refused_s * 1000:.0f} ms; after one left a new connection got {served}; {bystander.summary()}")


def _served(edge: Edge) -> int | None:
    status = get_models(edge)
    return status if status == 200 else None


def test_the_daemon_memory_is_back_within_20_mib_after_every_bad_client(edge):
    """Last in the module: what the bad clients above left the daemon holding."""
    process = psutil.Process(edge.daemon.process.pid)
    assert get_models(edge) == 200
    try:
        rss = wait_for(lambda: (r := process.memory_info().rss) - edge.baseline_rss_bytes <= RSS_GROWTH_BYTES and r,
                       10, "the daemon's RSS to settle")
    except AssertionError:
        rss = process.memory_info().rss
    growth = rss - edge.baseline_rss_bytes
    report(f"daemon RSS {edge.baseline_rss_bytes / (1 << 20):.1f} MiB before the bad clients, "
           f"{rss / (1 << 20):.1f} MiB after ({growth / (1 << 20):+.1f} MiB)")
    assert growth <= RSS_GROWTH_BYTES, f"the daemon's RSS grew {growth / (1 << 20):.1f} MiB"
