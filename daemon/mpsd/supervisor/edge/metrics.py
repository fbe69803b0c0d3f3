"""Prometheus figures of one daemon, in a registry of its own.

Two kinds. What happens to requests is counted as it happens, by the public
service (RequestMetrics: requests by final status, tokens, time to first
token, time between tokens). What the daemon holds now (queues, workers by
state, memory, restarts, each worker's prefix cache) is read at scrape time by
FleetCollector from the fleet's snapshot (the one status renders) and the
pools, which stay the only owners of that state; the scrape runs on the event
loop (the HTTP edge), so it never reads them mid-change.
The registry is private, not prometheus_client's global default, so two
services in one interpreter (tests) never share or collide on figures.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mpsd import __version__
from mpsd.supervisor.fleet.snapshot import FleetSnapshot, MemoryReading
from mpsd.supervisor.fleet.states import WorkerState

if TYPE_CHECKING:  # the public service imports this module and needs neither
    from mpsd.supervisor.fleet.fleet import Fleet
    from mpsd.supervisor.routing.pool import ModelPool

# The model label of a request that names no configured model: label values must not come from clients, or
# any caller could grow the registry without bound. No model can have this name (see config.NAME_PATTERN).
UNKNOWN_MODEL = "(unknown)"
# Queueing plus the first decode step: milliseconds when a worker is free, seconds behind a queue or a cold load.
FIRST_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One decode step plus the hop through the daemon: well under a millisecond for tiny models, tens for large ones.
INTER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Spawn to READY: seconds for small models, minutes for large ones read from a cold disk.
READY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RequestMetrics:
    """The request path's counters and histograms; `registry` is what /metrics serves."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.registry = CollectorRegistry()
        self._clock = clock
        # protocol: "grpc", or "http" for the OpenAI-compatible API, whose calls count under the gRPC method they
        # map to (Chat, Generate) and the gRPC status code their HTTP status was chosen from.
        self.requests = Counter("mpsd_requests", "Requests answered, by model, method, protocol and final gRPC status "
                                "code.", ["model", "method", "protocol", "code"], registry=self.registry)
        self.tokens = Counter("mpsd_generated_tokens", "Tokens streamed to clients.", ["model"], registry=self.registry)
        self.first_token = Histogram(
            "mpsd_time_to_first_token_seconds", "From a Generate call's arrival to its first token, queueing included.",
            ["model"], buckets=FIRST_TOKEN_BUCKETS, registry=self.registry)
        self.inter_token = Histogram(
            "mpsd_inter_token_seconds", "Between two consecutive tokens of one stream, as the daemon forwards them.",
            ["model"], buckets=INTER_TOKEN_BUCKETS, registry=self.registry)
        self.duration = Histogram(
            "mpsd_request_duration_seconds", "From a call's arrival to its end, whatever the status.",
            ["model", "method", "protocol"], buckets=REQUEST_BUCKETS, registry=self.registry)
        self.time_to_ready = Histogram(
            "mpsd_worker_time_to_ready_seconds", "From a worker's spawn to READY (its model loaded and warmed).",
            ["model"], buckets=READY_BUCKETS, registry=self.registry)
        self.waited_for_load = Counter(
            "mpsd_requests_waited_for_load", "Requests that arrived when their model had no READY worker and were "
            "served once one loaded.", ["model"], registry=self.registry)

    def start(self, model: str, method: str, protocol: str = "grpc") -> RequestTimer:
        return RequestTimer(self, model, method, protocol, self._clock)


class RequestTimer:
    """One call: `token()` as each token message goes out, `finish(code)` once at the end."""

    def __init__(self, metrics: RequestMetrics, model: str, method: str, protocol: str,
                 clock: Callable[[], float]) -> None:
        self._metrics, self._model, self._method, self._protocol, self._clock = metrics, model, method, protocol, clock
        self._started = clock()
        self._last_token: float | None = None

    def token(self) -> None:
        now = self._clock()
        if self._last_token is None:
            # Bound at the first token, not per token (labels() takes a lock and a lookup), and not before
            # (a call that streams nothing, or a Predict, should not list token series of 0).
            self._tokens = self._metrics.tokens.labels(self._model)
            self._inter_token = self._metrics.inter_token.labels(self._model)
            self._metrics.first_token.labels(self._model).observe(now - self._started)
        else:
            self._inter_token.observe(now - self._last_token)
        self._last_token = now
        self._tokens.inc()

    def finish(self, code: grpc.StatusCode) -> None:
        self._metrics.requests.labels(self._model, self._method, self._protocol, code.name).inc()
        self._metrics.duration.labels(self._model, self._method, self._protocol).observe(self._clock() - self._started)


def watch_daemon(registry: CollectorRegistry, fleet: Fleet, pools: dict[str, ModelPool]) -> None:
    """Adds what a scrape reads from the running daemon: its fleet and pools, its own process, its version."""
    registry.register(FleetCollector(fleet, pools))
    ProcessCollector(registry=registry)  # the daemon's own CPU, memory and open files (Linux; nothing elsewhere)
    Info("mpsd_build", "The daemon's version.", registry=registry).info({"version": __version__})


class FleetCollector(Collector):
    """Renders the fleet's snapshot and the pools at scrape time; changes nothing."""

    def __init__(self, fleet: Fleet, pools: dict[str, ModelPool]) -> None:
        self._fleet = fleet
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        snapshot = self._fleet.snapshot()  # memory read now, not when admission last looked
        yield from self._requests()
        yield from _workers(snapshot)
        yield from _prefix_caches(snapshot)
        yield from _memory(snapshot.memory)
        yield from _devices(snapshot.memory)

    def _requests(self) -> Iterator[Metric]:
        queued = GaugeMetricFamily("mpsd_queue_depth", "Requests waiting for a free worker.", labels=["model"])
        inflight = GaugeMetricFamily("mpsd_inflight_requests", "Requests a worker is running now.", labels=["model"])
        for name, pool in sorted(self._pools.items()):
            queued.add_metric([name], pool.queued)
            inflight.add_metric([name], pool.inflight_total)
        yield queued
        yield inflight


def _workers(snapshot: FleetSnapshot) -> Iterator[Metric]:
    # Workers of a model removed by reload stay listed until they have stopped, its counts for good.
    by_state = GaugeMetricFamily("mpsd_workers", "Workers by state (every state, 0 included).",
                                 labels=["model", "state"])
    restarts = CounterMetricFamily("mpsd_worker_restarts", "Worker processes started after a worker's first.",
                                   labels=["model"])
    ooms = CounterMetricFamily("mpsd_worker_ooms", "Out-of-memory events: a worker died of one (exit) "
                               "or failed a request with one and lived (in_request).", labels=["model", "kind"])
    footprints = GaugeMetricFamily("mpsd_model_footprint_bytes", "Memory admission expects one more worker "
                                   "of the model to hold, and where that figure comes from.",
                                   labels=["model", "source"])
    shared = GaugeMetricFamily("mpsd_model_shared_memory_bytes", "Clean file-backed pages a model's workers map "
                               "(mostly its weights), counted once: the most any one of them maps.", labels=["model"])
    loads = CounterMetricFamily("mpsd_demand_loads", "Workers started because requests waited.", labels=["model"])
    stops = CounterMetricFamily("mpsd_demand_stops", "Workers demand stopped: idle past keep_alive, or evicted to make "
                                "room for another model.", labels=["model", "reason"])
    for model in sorted(snapshot.models, key=lambda m: m.name):
        loads.add_metric([model.name], model.counts.demand_starts)
        stops.add_metric([model.name, "idle"], model.counts.idle_stops)
        stops.add_metric([model.name, "evicted"], model.counts.evictions)
        counts = collections.Counter(w.state for w in snapshot.workers_of(model.name))
        for state in WorkerState:
            by_state.add_metric([model.name, state.value], counts[state])
        restarts.add_metric([model.name], model.counts.restarts)
        ooms.add_metric([model.name, "exit"], model.counts.oom_exits)
        ooms.add_metric([model.name, "in_request"], model.counts.request_ooms)
        if model.config is not None:
            footprints.add_metric([model.name, model.footprint_source], model.footprint_bytes)
            shared.add_metric([model.name], model.shared_bytes)
    measured = GaugeMetricFamily("mpsd_worker_footprint_bytes", "Memory each live worker's process tree holds as the "
                                 "OS sees it, clean file-backed pages left out (what status shows as its memory).",
                                 labels=["model", "worker"])
    kinds = GaugeMetricFamily("mpsd_worker_memory_bytes", "Each live worker's process tree by kind: footprint (as "
                              "mpsd_worker_footprint_bytes), rss, uss, pss (0 on macOS) and clean (resident clean "
                              "pages, mostly mapped weights).", labels=["model", "worker", "kind"])
    for worker in snapshot.workers:
        if worker.pid:
            measured.add_metric([worker.model, worker.id], worker.memory_bytes)
            memory = worker.process_memory
            for kind, value in (("footprint", memory.footprint), ("rss", memory.rss), ("uss", memory.uss),
                                ("pss", memory.pss), ("clean", memory.clean_bytes)):
                kinds.add_metric([worker.model, worker.id, kind], value)
    yield from (by_state, restarts, ooms, footprints, shared, measured, kinds, loads, stops)


def _prefix_caches(snapshot: FleetSnapshot) -> Iterator[Metric]:
    """Each live worker's prefix cache as it last reported it (a worker keeping none, or with prefix_cache "0",
    lists none). Its counters are the process's own: they start again at 0 when the worker restarts."""
    labels = ["model", "worker"]
    held = GaugeMetricFamily("mpsd_prefix_cache_bytes", "KV a worker's prefix cache holds now (tensor bytes).",
                             labels=labels)
    budget = GaugeMetricFamily("mpsd_prefix_cache_budget_bytes", "The most a worker's prefix cache may hold now "
                               "(below what prefix_cache configured while admission shrinks it).", labels=labels)
    entries = GaugeMetricFamily("mpsd_prefix_cache_entries", "Earlier prompts (with their answers) a worker's prefix "
                                "cache keeps now.", labels=labels)
    hits = CounterMetricFamily("mpsd_prefix_cache_hit_tokens", "Prompt tokens served from a worker's prefix cache, "
                               "not prefilled again.", labels=labels)
    misses = CounterMetricFamily("mpsd_prefix_cache_miss_tokens", "Prompt tokens a worker with a prefix cache "
                                 "prefilled.", labels=labels)
    evictions = CounterMetricFamily("mpsd_prefix_cache_evictions", "Entries a worker's prefix cache dropped to stay "
                                    "inside its budget.", labels=labels)
    for worker in snapshot.workers:
        cache = worker.stats.prefix_cache if worker.pid and worker.stats is not None else None
        if cache is None or not cache.configured_bytes:
            continue
        key = [worker.model, worker.id]
        for family, value in ((held, cache.bytes), (budget, cache.budget_bytes), (entries, cache.entries),
                              (hits, cache.hit_tokens), (misses, cache.miss_tokens), (evictions, cache.evictions)):
            family.add_metric(key, value)
    yield from (held, budget, entries, hits, misses, evictions)


def _memory(memory: MemoryReading) -> Iterator[Metric]:
    yield GaugeMetricFamily("mpsd_memory_headroom_bytes", "Memory admission keeps free ([memory] headroom).",
                            value=memory.headroom_bytes)
    snap = memory.snapshot
    if snap is None:
        return  # the probe failed (the log says why): no figure is better than a stale one
    for name, text, value in (
        ("budget", "The ceiling workers may use, from the memory probe or [memory] budget.", snap.budget_bytes),
        ("used", "What the memory probe counts as used, workers included.", snap.used_bytes),
        ("available", "What the memory probe counts as available.", snap.available_bytes),
        ("free_for_workers", "Room for new workers after other use, live workers and headroom.",
         memory.free_for_workers_bytes),
    ):
        yield GaugeMetricFamily(f"mpsd_memory_{name}_bytes", text, value=value)


DEVICE_FIGURES = (
    ("budget", "The ceiling workers may use on the device, from the memory probe or [memory] budget."),
    ("used", "What the memory probe counts as used on the device, workers included."),
    ("available", "What the memory probe counts as available on the device."),
    ("headroom", "Memory admission keeps free on the device ([memory] headroom or the device's own)."),
    ("free_for_workers", "Room for one more worker on the device after other use, its live workers and headroom."),
)


def _devices(memory: MemoryReading) -> Iterator[Metric]:
    """Every device the probe sees, labelled `device`: its memory, the workers on it, and the driver's utilization
    and temperature where it gives them (NVML)."""
    families = {name: GaugeMetricFamily(f"mpsd_device_memory_{name}_bytes", text, labels=["device"])
                for name, text in DEVICE_FIGURES}
    workers = GaugeMetricFamily("mpsd_device_workers", "Workers with a process whose memory is on the device.",
                                labels=["device"])
    busy = GaugeMetricFamily("mpsd_device_utilization_percent", "The GPU's utilization as its driver reports it.",
                             labels=["device"])
    heat = GaugeMetricFamily("mpsd_device_temperature_celsius", "The GPU's temperature as its driver reports it.",
                             labels=["device"])
    for device in memory.devices:
        snap, name = device.snapshot, [device.snapshot.device]
        for figure, value in (("budget", snap.budget_bytes), ("used", snap.used_bytes),
                              ("available", snap.available_bytes), ("headroom", device.headroom_bytes),
                              ("free_for_workers", device.free_for_workers_bytes)):
            families[figure].add_metric(name, value)
        workers.add_metric(name, len(device.workers))
        if snap.utilization_percent is not None:
            busy.add_metric(name, snap.utilization_percent)
        if snap.temperature_c is not None:
            heat.add_metric(name, snap.temperature_c)
    yield from (*families.values(), workers, busy, heat)
