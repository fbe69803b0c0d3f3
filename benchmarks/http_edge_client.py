"""The HTTP edge benchmark's client: a process of its own, the same raw asyncio HTTP/1.1 client for every server.

`python -m benchmarks.http_edge_client --port P --server-pid PID --phase warmup|load [sizes]` prints one JSON line.
Every connection is keep-alive; a response is read by its own framing (content-length or chunked), so the client
does the same small amount of work whichever server answers. warmup: a short pass of both loads, nothing kept;
load: `passes` rounds of `streams` concurrent SSE streams of `events` events each (tokens/s over their wall time),
then `requests` sequential small JSON requests on one connection (each timed from the first byte sent to the last
read). The server's CPU time during each load is read from /proc where there is one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from benchmarks.timing import percentiles_ms

HOST = "127.0.0.1"
SMALL_BODY = json.dumps({"model": "demo", "prompt": "hi", "max_tokens": 2}).encode()


class BadResponse(Exception):
    """The server answered something other than what every server here must answer."""


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(HOST, port))

    def send(self, body: bytes) -> None:
        self.writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(body), body))

    async def head(self) -> dict[bytes, bytes]:
        lines = (await self.reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 200"):
            raise BadResponse(f"status line {lines[0][:100]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        return headers

    async def pieces(self, headers: dict[bytes, bytes]):
        """The body as the server framed it."""
        if b"content-length" in headers:
            yield await self.reader.readexactly(int(headers[b"content-length"]))
            return
        if headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            raise BadResponse(f"neither content-length nor chunked: {headers!r}")
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return
            yield (await self.reader.readexactly(size + 2))[:-2]

    async def small(self) -> float:
        """One fixed JSON completion; seconds from sending to the end of its body."""
        started = time.perf_counter()
        self.send(SMALL_BODY)
        body = b"".join([piece async for piece in self.pieces(await self.head())])
        elapsed = time.perf_counter() - started
        if not body.startswith(b'{"id": "cmpl-bench"'):
            raise BadResponse(f"body {body[:100]!r}")
        return elapsed

    async def stream(self, events: int) -> int:
        """One SSE stream; the tokens it carried (events before [DONE])."""
        self.send(json.dumps({"model": "demo", "prompt": "hi", "max_tokens": events, "stream": True}).encode())
        headers = await self.head()
        if not headers.get(b"content-type", b"").startswith(b"text/event-stream"):
            raise BadResponse(f"content-type {headers.get(b'content-type')!r}")
        seen, pending, last = 0, b"", b""
        async for piece in self.pieces(headers):
            pending += piece
            if b"\n\n" in pending:
                complete, _, pending = pending.rpartition(b"\n\n")
                seen += complete.count(b"\n\n") + 1
                last = complete.rsplit(b"\n\n", 1)[-1]
        if last != b"data: [DONE]" or pending:
            raise BadResponse(f"stream ended with {last[-60:]!r} and {pending[:60]!r} left")
        if seen - 1 != events:
            raise BadResponse(f"{seen - 1} events, not {events}")
        return seen - 1

    def close(self) -> None:
        self.writer.close()


def _server_cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_ms_per(before: float | None, after: float | None, count: int, per: int) -> float | None:
    if before is None or after is None or not count:
        return None
    return round((after - before) * 1000 * per / count, 2)


async def sse(port: int, server_pid: int, streams: int, events: int, passes: int) -> dict:
    connections = [await Connection.open(port) for _ in range(streams)]
    try:
        tokens, seconds = 0, 0.0
        cpu_before = _server_cpu_s(server_pid)
        for _ in range(passes):
            started = time.perf_counter()
            tokens += sum(await asyncio.gather(*(c.stream(events) for c in connections)))
            seconds += time.perf_counter() - started
        cpu_after = _server_cpu_s(server_pid)
    finally:
        for connection in connections:
            connection.close()
    return {"streams": streams, "tokens": tokens, "seconds": round(seconds, 4), "tps": round(tokens / seconds, 1),
            "server_cpu_ms_per_1k_tokens": _cpu_ms_per(cpu_before, cpu_after, tokens, 1000)}


async def latency(port: int, server_pid: int, requests: int) -> dict:
    connection = await Connection.open(port)
    try:
        cpu_before = _server_cpu_s(server_pid)
        samples = [await connection.small() for _ in range(requests)]
        cpu_after = _server_cpu_s(server_pid)
    finally:
        connection.close()
    return {"requests": requests, **percentiles_ms(samples), "mean": round(sum(samples) / len(samples) * 1000, 3),
            "server_cpu_ms_per_request": _cpu_ms_per(cpu_before, cpu_after, requests, 1)}


async def run(args: argparse.Namespace) -> dict:
    if args.phase == "warmup":
        await sse(args.port, args.server_pid, args.streams, max(1, args.events // 10), 1)
        await latency(args.port, args.server_pid, max(1, args.requests // 10))
        return {"phase": "warmup"}
    return {"phase": "load", "sse": await sse(args.port, args.server_pid, args.streams, args.events, args.passes),
            "latency": await latency(args.port, args.server_pid, args.requests)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.http_edge_client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--phase", choices=("warmup", "load"), required=True)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(asyncio.run(run(args))))
    except (BadResponse, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {str(exc)[:300]}"}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
