"""The read-only status page of the HTTP edge: `/`, its static files, `/api/status`, `/api/history`.

The static files are a shell with no data in them, so the route table
(routes.py) serves them without the token: the browser must load the page to
ask for it. The data comes only from `/api/*`, under the token.
`/api/status` is the admin service's own Status rendered by `to_plain`, so it
is what `mpsctl status --json` prints, field for field. `/api/history` is the
ring `run()` fills once a second from the fleet's snapshot, the pools and the
request counters, on the event loop like every other reader. Nothing here
changes the fleet: the admin plane stays on its unix socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from importlib import resources
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from mpsd.proto_plain import to_plain
from mpsd.supervisor.edge.http.status_history import HistoryRing, ModelFigures, TransitionLines

if TYPE_CHECKING:
    from mpsd.supervisor.edge.metrics import RequestMetrics
    from mpsd.supervisor.fleet.fleet import Fleet
    from mpsd.supervisor.routing.pool import ModelPool

JSON = "application/json"
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8"}
STATIC_FILES = ("index.html", "status.js", "status.css")
API_PATHS = ("/api/status", "/api/history")

Answer = tuple[str, bytes]  # content type, body


class StatusPage:
    def __init__(self, fleet: Fleet, pools: dict[str, ModelPool], metrics: RequestMetrics,
                 status: Callable[[], Awaitable[Any]], history: HistoryRing | None = None,
                 transitions: TransitionLines | None = None) -> None:
        self._fleet = fleet
        self._pools = pools
        self._metrics = metrics
        self._status = status
        self.history = history or HistoryRing()
        self.transitions = transitions or TransitionLines()
        folder = resources.files("mpsd.supervisor.edge.http") / "static"
        self._files = {f"/{name}": folder.joinpath(name).read_bytes() for name in STATIC_FILES}
        self._files["/"] = self._files["/index.html"]
        self._sampling: asyncio.Task | None = None

    def static_paths(self) -> list[str]:
        """The shell: `/` and its files, the same for everyone."""
        return list(self._files)

    async def answer(self, path: str) -> Answer:
        """A GET of one of `static_paths()` or API_PATHS."""
        if path == "/api/status":
            return JSON, json.dumps(to_plain(await self._status())).encode()
        if path == "/api/history":
            body = self.history.as_plain() | {"transitions": self.transitions.as_list()}
            return JSON, json.dumps(body).encode()
        suffix = "." + path.rpartition(".")[2] if "." in path else ".html"
        return STATIC_TYPES[suffix], self._files[path]

    def start(self) -> None:
        """Samples the history in the background until the event loop ends."""
        self._sampling = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Samples once a period until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.history.period_s)

    def sample(self) -> None:
        snapshot = self._fleet.snapshot()
        tokens, first_token = self._tokens_by_model(), self._first_token_buckets()
        models = {}
        for view in snapshot.models:
            if view.config is None:
                continue
            pool = self._pools.get(view.name)
            models[view.name] = ModelFigures(
                tokens_total=tokens.get(view.name, 0.0), queued=pool.queued if pool else 0,
                inflight=pool.inflight_total if pool else 0, ready=view.live,
                first_token_buckets=tuple(first_token.get(view.name, ())))
        memory = snapshot.memory.snapshot
        self.history.add(time.time(), models, memory.used_bytes if memory else 0, memory.budget_bytes if memory else 0)

    def _tokens_by_model(self) -> dict[str, float]:
        return {sample.labels["model"]: sample.value for family in self._metrics.tokens.collect()
                for sample in family.samples if sample.name.endswith("_total")}

    def _first_token_buckets(self) -> dict[str, list[tuple[float, float]]]:
        buckets: dict[str, list[tuple[float, float]]] = {}
        for family in self._metrics.first_token.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    buckets.setdefault(sample.labels["model"], []).append((float(sample.labels["le"]), sample.value))
        return buckets
