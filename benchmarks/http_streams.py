"""Streams over HTTP: the peers' NDJSON (one line per token) and mlx_lm.server's OpenAI SSE.

Starting a stream sends the request at once; its response is read on the
first pull, so sending a batch of requests never waits on a server's queue.
"""

from __future__ import annotations

import contextlib
import http.client
import json
from typing import Iterator

from benchmarks.peer_install import PeerError

REQUEST_TIMEOUT_S = 300


def start_ndjson(port: int, path: str, prompt: str, max_tokens: int) -> Iterator[bytes]:
    """One streamed request to a peer; each NDJSON line is one token."""
    connection = _send(port, path, {"prompt": prompt, "max_tokens": max_tokens})
    return _lines(connection, path)


def _lines(connection: http.client.HTTPConnection, path: str) -> Iterator[bytes]:
    with _reading(connection, path) as response:
        while line := response.readline():
            if line.strip():
                json.loads(line)
                yield line


class CompletionStream:
    """One streamed, greedy /v1/completions request to mlx_lm.server. It sends one event per token that adds
    text, so the token count is the one its final usage event reports (reported_tokens)."""

    def __init__(self, port: int, prompt: str, max_tokens: int) -> None:
        self.reported_tokens: int | None = None
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        self._events = self._read(_send(port, "/v1/completions", body))

    def __iter__(self) -> "CompletionStream":
        return self

    def __next__(self) -> dict:
        return next(self._events)

    def _read(self, connection: http.client.HTTPConnection) -> Iterator[dict]:
        with _reading(connection, "/v1/completions") as response:
            while line := response.readline():
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    return
                event = json.loads(payload)
                if event.get("usage"):
                    self.reported_tokens = int(event["usage"]["completion_tokens"])
                choices = event.get("choices") or []
                if choices and choices[0].get("text"):
                    yield event


def _send(port: int, path: str, body: dict) -> http.client.HTTPConnection:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    except OSError as exc:
        connection.close()
        raise PeerError(f"POST {path} failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    return connection


@contextlib.contextmanager
def _reading(connection: http.client.HTTPConnection, path: str) -> Iterator[http.client.HTTPResponse]:
    """The response of a sent request, its failures as PeerError, the connection closed at the end."""
    try:
        response = connection.getresponse()
        if response.status != 200:
            raise PeerError(f"POST {path} answered HTTP {response.status}: {response.read()[:200]!r}")
        yield response
    except TimeoutError:
        raise PeerError(f"POST {path} sent nothing for {REQUEST_TIMEOUT_S}s") from None
    except (OSError, http.client.HTTPException) as exc:
        raise PeerError(f"POST {path} failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        connection.close()


def sse_events(port: int, path: str, body: dict) -> Iterator[dict]:
    """One streamed OpenAI request (sent at once): every `data:` event it answers, parsed, up to `[DONE]`."""
    connection = _send(port, path, body)
    return _events(connection, path)


def _events(connection: http.client.HTTPConnection, path: str) -> Iterator[dict]:
    with _reading(connection, path) as response:
        while line := response.readline():
            if line.startswith(b"data: "):
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    return
                yield json.loads(payload)
