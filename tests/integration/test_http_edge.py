"""The HTTP edge of a real daemon: the [daemon] http_* keys reach it, and metrics_listen adds an address that serves
the same routes under the same limits (one connection count for both)."""

import json
import re
import socket
import time
import urllib.request

import pytest

from support import running_daemon

CONFIG = """
[daemon]
metrics_listen = "127.0.0.1:0"
http_head_timeout = "0.5s"
http_max_connections = 3
http_max_body = "1KiB"

[[models]]
name = "n"
backend = "null-lm"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("edge"), CONFIG, ready=1) as daemon:
        yield daemon


def addresses(daemon) -> list[tuple[str, int]]:
    return [(host, int(port)) for host, port in
            re.findall(r"HTTP edge listening on http://([\d.]+):(\d+) \(/v1, /metrics, status page /\)", daemon.log())]


def answer_to(address: tuple[str, int], data: bytes, dribble_s: float = 0) -> tuple[int, dict]:
    """Sends `data` (a byte at a time every `dribble_s` when given) and reads the answer to the end."""
    with socket.create_connection(address, timeout=10) as connection:
        try:
            for piece in ([bytes([b]) for b in data] if dribble_s else [data]):
                connection.sendall(piece)
                time.sleep(dribble_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed while the client was still sending
        answer = connection.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body) if body.startswith(b"{") else {}


def test_both_addresses_serve_every_route(daemon):
    both = addresses(daemon)
    assert len(both) == 2 and len(set(both)) == 2
    for host, port in both:
        for path in ("/metrics", "/api/status", "/v1/models", "/"):
            with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as response:
                assert response.status == 200


def test_the_configured_head_deadline_holds_against_a_dribbling_client(daemon):
    started = time.monotonic()
    status, body = answer_to(addresses(daemon)[1], b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 200, 0.05)
    assert status == 408 and "not received within 0.5s" in body["error"]["message"]
    assert time.monotonic() - started < 5


def test_the_configured_body_cap_answers_413_before_the_body(daemon):
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2048\r\n\r\n"
    for address in addresses(daemon):
        status, body = answer_to(address, head)
        assert status == 413 and body["error"]["message"] == "body: over the limit of 1024 bytes"


def test_the_connection_cap_counts_both_addresses(daemon):
    http, metrics = addresses(daemon)
    held = [socket.create_connection(address, timeout=10) for address in (http, metrics, http)]
    try:
        for connection in held:  # each answered once, so the daemon has surely counted it
            connection.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert connection.recv(65536).startswith(b"HTTP/1.1 200 ")
        status, body = answer_to(metrics, b"")
        assert status == 503 and "limit of 3 HTTP connections" in body["error"]["message"]
    finally:
        for connection in held:
            connection.close()
