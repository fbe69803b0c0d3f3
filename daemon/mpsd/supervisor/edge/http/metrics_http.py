"""GET /metrics over HTTP, answered on the daemon's event loop.

prometheus_client's start_http_server answers from a thread of its own, and a
scrape reads the fleet and the pools, which only the event loop may touch:
from another thread it would read them mid-change. This is the least HTTP a
scraper needs: one request per connection, GET /metrics, then close. The
format is chosen from the Accept header as prometheus_client's own server
chooses it: OpenMetrics when the scraper asks (Prometheus does), else the
classic text format.

The same listener serves the read-only status page (status_page.py) when the
daemon hands one over: GET only, and a request line or header longer than
MAX_LINE_BYTES gets 413, so a huge query costs one bounded read.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

PATH = "/metrics"
READ_TIMEOUT_S = 10.0   # a client that does not finish its request head by then is dropped
MAX_HEADER_LINES = 100
MAX_LINE_BYTES = 8192
TEXT = "text/plain; charset=utf-8"

if TYPE_CHECKING:
    from mpsd.supervisor.edge.http.status_page import StatusPage


async def start_metrics_server(host: str, port: int, registry: CollectorRegistry,
                               page: StatusPage | None = None) -> asyncio.Server:
    """Serves `registry` (and `page`, when given) on host:port (port 0: any free one); raises OSError when it cannot bind."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request_line, accept = await asyncio.wait_for(_read_head(reader), READ_TIMEOUT_S)
            except ValueError:  # a line past MAX_LINE_BYTES
                too_long = f"request line or header over {MAX_LINE_BYTES} bytes\n".encode()
                response = _message("413 Content Too Large", TEXT, too_long)
            else:
                response = await _response(request_line, accept, registry, page)
            writer.write(response)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass  # a client that stalls or leaves gets no answer; the next scrape is another call
        finally:
            writer.close()

    return await asyncio.start_server(answer, host.strip("[]"), port, limit=MAX_LINE_BYTES)


def url_of(server: asyncio.Server, host: str) -> str:
    """Where a scraper finds it: the configured host (as written) and the port bound (port 0 picks one)."""
    return f"http://{host}:{server.sockets[0].getsockname()[1]}{PATH}"


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, str]:
    """The request line and the Accept header; other headers are read past."""
    request_line, accept = await reader.readline(), ""
    for _ in range(MAX_HEADER_LINES):
        header = (await reader.readline()).decode("latin-1").strip()
        if not header:
            break
        name, _, content = header.partition(":")
        if name.strip().lower() == "accept":
            accept = content.strip()
    return request_line, accept


async def _response(request_line: bytes, accept: str, registry: CollectorRegistry, page: StatusPage | None) -> bytes:
    parts = request_line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _message("400 Bad Request", TEXT, b"not an HTTP request\n")
    method, target = parts[0], parts[1].partition("?")[0]
    page_paths = page.paths() if page else set()
    if target != PATH and target not in page_paths:
        where = f"metrics are at {PATH}" + (", the status page at /" if page else "")
        return _message("404 Not Found", TEXT, f"not found: {where}\n".encode())
    if method != "GET":
        return _message("405 Method Not Allowed", TEXT, b"only GET\n", "Allow: GET\r\n")
    if target != PATH:
        status, content_type, body = await page.answer(target)
        return _message(status, content_type, body, "Cache-Control: no-store\r\n")
    encode, content_type = choose_encoder(accept)
    return _message("200 OK", content_type, encode(registry))


def _message(status: str, content_type: str, body: bytes, extra_headers: str = "") -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}Connection: close\r\n\r\n")
    return head.encode("latin-1") + body
