"""The HTTP edge's one route table: every path mpsd answers over HTTP, the methods it takes, and who may ask.

One table for the OpenAI API, Prometheus /metrics and the status page, so
that one listener serves them all under one access rule (access.py, the
rule gRPC calls obey): with a token configured every route needs it, but
the page's static shell, which holds no data and must load for the browser
to ask for the token. A route that takes GET takes HEAD too (RFC 9110 asks
it of every GET). Refusals are the OpenAI error body on every path, so a
client parses one shape.

A scrape is answered on the event loop like every other route: the fleet
and the pools are only read there, never from prometheus_client's own
server thread mid-change. The format is chosen from the Accept header as
prometheus_client's own server chooses it: OpenMetrics when the scraper
asks (Prometheus does), else the classic text format.
"""

from __future__ import annotations

import dataclasses
from typing import Awaitable, Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from mpsd.supervisor.edge.access import AccessRule
from mpsd.supervisor.edge.http.openai import COMPLETIONS, OpenAIApi, send_json
from mpsd.supervisor.edge.http.openai_schema import error
from mpsd.supervisor.edge.http.server import Exchange, HttpRequest
from mpsd.supervisor.edge.http.status_page import API_PATHS, StatusPage

NAME = "{name}"  # a route pattern's last segment that matches any one segment (a model's name)
NO_TOKEN = "a bearer token is required: send the header 'Authorization: Bearer TOKEN'"


@dataclasses.dataclass(frozen=True)
class Route:
    methods: tuple[str, ...]
    answer: Callable[[HttpRequest, Exchange], Awaitable[None]]
    open: bool = False  # served without the token: it holds no data

    def takes(self, method: str) -> bool:
        return method in self.methods or (method == "HEAD" and "GET" in self.methods)

    @property
    def allowed(self) -> tuple[str, ...]:
        return self.methods + (("HEAD",) if "GET" in self.methods else ())


class Routes:
    """`handle` is the HttpServer's handler: it finds the route, checks the method and the token, then answers."""

    def __init__(self, rule: AccessRule, api: OpenAIApi, registry: CollectorRegistry, page: StatusPage) -> None:
        self._rule, self._registry, self._page = rule, registry, page
        self._table: dict[str, Route] = {
            "/v1/models": Route(("GET",), api.models),
            f"/v1/models/{NAME}": Route(("GET",), api.model),
            **{path: Route(("POST",), api.complete) for path in COMPLETIONS},
            "/metrics": Route(("GET",), self._metrics),
            **{path: Route(("GET",), self._page_file) for path in API_PATHS},
            **{path: Route(("GET",), self._page_file, open=True) for path in page.static_paths()},
        }

    async def handle(self, request: HttpRequest, exchange: Exchange) -> None:
        route = self._find(request.path)
        if route is None:
            return await send_json(exchange, 404, error(404, f"no route {request.path}: mpsd serves {self._served()}",
                                                        code="unknown_url"))
        if not route.takes(request.method):
            allowed = " or ".join(route.allowed)
            return await send_json(exchange, 405, error(405, f"{request.path} takes {allowed}, not {request.method}"),
                                   (("allow", ", ".join(route.allowed)),))
        if not route.open and not self._rule.admits(request.headers.items()):
            return await send_json(exchange, 401, error(401, NO_TOKEN, code="invalid_api_key"),
                                   (("www-authenticate", "Bearer"),))
        await route.answer(request, exchange)

    def _find(self, path: str) -> Route | None:
        if (route := self._table.get(path)) is not None:
            return route
        parent, _, last = path.rpartition("/")
        return self._table.get(f"{parent}/{NAME}") if last else None

    def _served(self) -> str:
        by_path = [f"{' '.join(route.methods)} {path}" for path, route in self._table.items() if not route.open]
        return ", ".join(by_path) + " and the status page at /"

    async def _metrics(self, request: HttpRequest, exchange: Exchange) -> None:
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        await exchange.send(200, content_type, encode(self._registry))

    async def _page_file(self, request: HttpRequest, exchange: Exchange) -> None:
        content_type, body = await self._page.answer(request.path)
        await exchange.send(200, content_type, body, (("cache-control", "no-store"),))
