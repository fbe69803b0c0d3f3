"""The HTTP edge benchmark's server: a daemon-like process, then one HTTP library on its event loop.

Run by benchmarks/http_edge.py with the http-edge venv's python (or, for the h11 server alone, any python that has
mpsd's dependencies and mpsd on its path):
  http_edge_app.py --server h11|aiohttp|uvicorn-h11|uvicorn-httptools --port P

Daemon-like: before any HTTP library it imports what the daemon imports for its other planes (grpc with grpc.aio,
grpc_health, prometheus_client, psutil, mpsd.config) and starts a grpc.aio server with the health servicer on a
loopback port, as the daemon does; only then is the HTTP library imported and started, in the same event loop.

Serves, on 127.0.0.1:
  GET  /health          -> 200 "ok"
  POST /v1/completions  {"max_tokens": N, "stream": true} -> N SSE events, each an OpenAI completion chunk
                        (`data: {json}\\n\\n`), then `data: [DONE]`; without "stream": one fixed completion, as JSON
Every server runs the same two answers (Answers); only how their bytes reach the socket differs. Each event is made
on the event loop from an asyncio source that awaits once per token, as a stream from a worker does, with no model.

Once it listens it prints `EDGE-READY {json}`: its RSS before the HTTP library was imported and once it serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import grpc.aio
import mpsd.config  # the daemon's own config module: imported before any HTTP library, by every variant alike
import prometheus_client
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVERS = ("h11", "aiohttp", "uvicorn-h11", "uvicorn-httptools")
HOST = "127.0.0.1"
MAX_BODY_BYTES = 8 << 20
SSE_HEADERS = (("cache-control", "no-cache"),)
COMPLETION = json.dumps({
    "id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "demo",
    "choices": [{"index": 0, "text": " fixed answer", "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
}).encode()
DONE = b"data: [DONE]\n\n"


class Answers:
    """What every server answers, as plain bytes: the handler that the libraries only carry."""

    @staticmethod
    def parse(body: bytes) -> tuple[bool, int]:
        """(streamed?, how many events) from the request's JSON body."""
        request = json.loads(body or b"{}")
        return bool(request.get("stream")), int(request.get("max_tokens", 16))

    @staticmethod
    async def events(count: int) -> AsyncIterator[bytes]:
        async for text in _tokens(count):
            chunk = {"id": "cmpl-bench", "object": "text_completion", "created": 0, "model": "demo",
                     "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        yield DONE


async def _tokens(count: int) -> AsyncIterator[str]:
    """The asyncio source: one await per token, as the router's stream from a worker awaits each message."""
    for index in range(count):
        await asyncio.sleep(0)
        yield f" t{index}"


def _error_body(status: int, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "code": status}}).encode()


async def serve_h11(port: int) -> Callable[[], Awaitable[None]]:
    """mpsd's own server (h11), built as its constructor stands: (handler, error_body, limits) since the edge's
    limits moved into one HttpLimits, (handler, error_body, max_body_bytes) before."""
    from mpsd.supervisor.edge.http import server as http_server

    async def handler(request, exchange) -> None:
        if request.path == "/health":
            return await exchange.send(200, "text/plain", b"ok")
        stream, count = Answers.parse(request.body)
        if not stream:
            return await exchange.send(200, "application/json", COMPLETION)
        await exchange.start(200, "text/event-stream", SSE_HEADERS)
        async for piece in Answers.events(count):
            await exchange.write(piece)
        await exchange.end()

    parameters = inspect.signature(http_server.HttpServer).parameters
    if "limits" in parameters:
        server = http_server.HttpServer(handler, _error_body, limits=mpsd.config.HttpLimits())
    else:
        server = http_server.HttpServer(handler, _error_body, max_body_bytes=MAX_BODY_BYTES)
    await server.start(HOST, port)

    async def stop() -> None:
        server.close()
    return stop


async def serve_aiohttp(port: int) -> Callable[[], Awaitable[None]]:
    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        stream, count = Answers.parse(await request.read())
        if not stream:
            return web.Response(body=COMPLETION, content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **dict(SSE_HEADERS)})
        await response.prepare(request)
        async for piece in Answers.events(count):
            await response.write(piece)
        await response.write_eof()
        return response

    async def healthy(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", healthy)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, HOST, port).start()
    return runner.cleanup


async def serve_uvicorn(port: int, http: str) -> Callable[[], Awaitable[None]]:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def completions(request: Request) -> Response:
        stream, count = Answers.parse(await request.body())
        if not stream:
            return Response(COMPLETION, media_type="application/json")
        return StreamingResponse(Answers.events(count), media_type="text/event-stream", headers=dict(SSE_HEADERS))

    async def healthy(_request: Request) -> Response:
        return PlainTextResponse("ok")

    class InLoopServer(uvicorn.Server):
        """The daemon keeps its own signal handling; uvicorn would take SIGINT and SIGTERM for itself."""

        def capture_signals(self):
            return contextlib.nullcontext()

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]), Route("/health", healthy)])
    config = uvicorn.Config(app, host=HOST, port=port, http=http, ws="none", lifespan="off", loop="none",
                            access_log=False, log_level="warning")
    server = InLoopServer(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()
            raise RuntimeError("uvicorn stopped before it started")
        await asyncio.sleep(0.01)

    async def stop() -> None:
        server.should_exit = True
        await serving
    return stop


async def main(server_name: str, port: int) -> None:
    grpc_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    grpc_server.add_insecure_port(f"{HOST}:0")
    await grpc_server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    prometheus_client.CollectorRegistry()
    me = psutil.Process()
    rss_before_http = me.memory_info().rss
    if server_name == "h11":
        stop = await serve_h11(port)
    elif server_name == "aiohttp":
        stop = await serve_aiohttp(port)
    else:
        stop = await serve_uvicorn(port, server_name.removeprefix("uvicorn-"))
    print("EDGE-READY " + json.dumps({"rss_before_http_bytes": rss_before_http,
                                      "rss_serving_bytes": me.memory_info().rss}), flush=True)
    try:
        await asyncio.Event().wait()  # until the harness ends the process
    finally:
        await stop()
        await grpc_server.stop(0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", choices=SERVERS, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.server, args.port))
    sys.exit(0)
