"""The daemon's Prometheus figures without processes: request timing and the fleet collector (their HTTP answer is
tested in test_http_routes.py)."""

import asyncio
import json
import pathlib

import grpc
from mpsd.config import parse_config
from mpsd.supervisor.edge.metrics import FleetCollector, RequestMetrics
from mpsd.supervisor.fleet.fleet import Fleet
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.probes import FileMemoryProbe
from mpsd.supervisor.memory.process_memory import ProcessMemory
from mpsd.supervisor.routing.pool import ModelPool
from mpsd.v1 import worker_pb2
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

GiB = 1024**3
METAL_OOM = "[METAL] Command buffer execution failed: Insufficient Memory (kIOGPUCommandBufferCallbackErrorOutOfMemory)"


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset], float]:
    """Every sample of a scrape, through the text format a scraper reads."""
    text = generate_latest(registry).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(scraped: dict, name: str, **labels) -> float:
    return scraped[(name, frozenset(labels.items()))]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_stream_gives_time_to_first_token_then_one_gap_per_further_token():
    clock = Clock()
    metrics = RequestMetrics(clock)
    timer = metrics.start("demo", "Generate")
    for at in (100.25, 100.2578125, 100.28125):  # exact in binary: gaps of 1/128 s and 3/128 s
        clock.now = at
        timer.token()
    clock.now = 101.0
    timer.finish(grpc.StatusCode.OK)
    metrics.start("(unknown)", "Predict").finish(grpc.StatusCode.NOT_FOUND)
    scraped = samples(metrics.registry)
    assert value(scraped, "mpsd_generated_tokens_total", model="demo") == 3
    assert value(scraped, "mpsd_time_to_first_token_seconds_count", model="demo") == 1
    assert value(scraped, "mpsd_time_to_first_token_seconds_sum", model="demo") == 0.25
    assert value(scraped, "mpsd_inter_token_seconds_count", model="demo") == 2
    assert value(scraped, "mpsd_inter_token_seconds_sum", model="demo") == 0.03125
    assert value(scraped, "mpsd_inter_token_seconds_bucket", model="demo", le="0.005") == 0
    assert value(scraped, "mpsd_inter_token_seconds_bucket", model="demo", le="0.01") == 1
    assert value(scraped, "mpsd_inter_token_seconds_bucket", model="demo", le="0.025") == 2
    assert value(scraped, "mpsd_requests_total", model="demo", method="Generate", protocol="grpc", code="OK") == 1
    assert value(scraped, "mpsd_requests_total", model="(unknown)", method="Predict", protocol="grpc",
                 code="NOT_FOUND") == 1
    assert value(scraped, "mpsd_request_duration_seconds_sum", model="demo", method="Generate", protocol="grpc") == 1.0
    assert not any(name.startswith(("mpsd_generated_tokens", "mpsd_time_to_first_token")) and ("model", "(unknown)") in labels
                   for name, labels in scraped), "a call that streamed nothing lists no token series"


class FakeProcess:
    pid = 4242
    stub = None
    stderr_tail = [METAL_OOM]


def make_fleet(tmp_path: pathlib.Path, **readers) -> Fleet:
    (tmp_path / "memory.json").write_text(json.dumps({"budget_bytes": 8 * GiB, "used_bytes": 3 * GiB}))
    config = parse_config("""
[memory]
probe = "file:memory.json"
headroom = "1GiB"
[[models]]
name = "a"
backend = "null-lm"
replicas = 2
footprint = "1GiB"
""", source="test.toml", base_dir=tmp_path)
    return Fleet(config, tmp_path, lambda model: {}, lambda *args: None, FileMemoryProbe(tmp_path / "memory.json"),
                 **(readers or {"footprint_of_pid": lambda pid: 0}))


def test_the_collector_reads_workers_memory_and_counts_as_the_fleet_holds_them(tmp_path):
    fleet = make_fleet(tmp_path)
    worker = fleet.workers["a-0"]
    worker.state, worker.process = WorkerState.READY, FakeProcess()  # as if it had been started and had loaded
    fleet.health.record_stats(worker, worker_pb2.WorkerStats(oom_events=2))
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet, {}))
    scraped = samples(registry)
    assert value(scraped, "mpsd_workers", model="a", state="READY") == 1
    assert value(scraped, "mpsd_workers", model="a", state="PENDING") == 1
    assert sum(value(scraped, "mpsd_workers", model="a", state=s.value) for s in WorkerState) == 2
    assert value(scraped, "mpsd_worker_ooms_total", model="a", kind="in_request") == 2
    assert value(scraped, "mpsd_worker_ooms_total", model="a", kind="exit") == 0
    assert value(scraped, "mpsd_model_footprint_bytes", model="a", source="configured") == GiB
    assert value(scraped, "mpsd_memory_budget_bytes") == 8 * GiB and value(scraped, "mpsd_memory_used_bytes") == 3 * GiB
    assert value(scraped, "mpsd_memory_headroom_bytes") == GiB
    # 8 budget - 1 headroom - 3 used (of which 1 is the live worker's footprint) = 4 GiB free for workers
    assert value(scraped, "mpsd_memory_free_for_workers_bytes") == 4 * GiB

    fleet._on_exit(worker, worker.process, -6, "")  # the Metal OOM line, then SIGABRT
    (tmp_path / "memory.json").write_text(json.dumps({"budget_bytes": 8 * GiB, "used_bytes": 2 * GiB}))
    scraped = samples(registry)
    assert value(scraped, "mpsd_worker_ooms_total", model="a", kind="exit") == 1
    assert value(scraped, "mpsd_worker_ooms_total", model="a", kind="in_request") == 2, "counts survive the process"
    assert value(scraped, "mpsd_workers", model="a", state="OOM") == 1
    assert value(scraped, "mpsd_memory_used_bytes") == 2 * GiB, "memory is read at scrape time"
    assert value(scraped, "mpsd_model_footprint_bytes", model="a", source="configured") == GiB


def test_in_flight_counts_requests_on_a_worker_that_left_ready_and_queue_depth_counts_waiters(tmp_path):
    fleet = make_fleet(tmp_path)

    async def scenario() -> list[tuple[float, float]]:
        pool = ModelPool("a", 1, 4, prospects=lambda: None)
        registry = CollectorRegistry()
        registry.register(FleetCollector(fleet, {"a": pool}))
        seen = []

        def look() -> None:
            scraped = samples(registry)
            seen.append((value(scraped, "mpsd_inflight_requests", model="a"), value(scraped, "mpsd_queue_depth", model="a")))

        pool.add_worker("a-0", None, 0)
        lease = await pool.acquire(None)
        waiter = asyncio.ensure_future(pool.acquire(None))
        await asyncio.sleep(0)
        look()
        pool.remove_worker("a-0")  # it drains: the request it runs goes on
        look()
        pool.release(lease)
        look()
        waiter.cancel()
        return seen

    assert asyncio.run(scenario()) == [(1, 1), (1, 1), (0, 1)]



def test_each_live_worker_with_a_prefix_cache_gives_its_figures_and_one_with_none_gives_no_series(tmp_path):
    fleet = make_fleet(tmp_path)
    cached, plain = fleet.workers["a-0"], fleet.workers["a-1"]
    for worker in (cached, plain):
        worker.state, worker.process = WorkerState.READY, FakeProcess()
    fleet.health.record_stats(cached, worker_pb2.WorkerStats(prefix_cache=worker_pb2.PrefixCacheStats(
        bytes=3 << 20, budget_bytes=64 << 20, configured_bytes=128 << 20, entries=2, hit_tokens=40, miss_tokens=60,
        evictions=1)))
    fleet.health.record_stats(plain, worker_pb2.WorkerStats(prefix_cache=worker_pb2.PrefixCacheStats(miss_tokens=9)))
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet, {}))
    scraped = samples(registry)
    for name, expected in (("mpsd_prefix_cache_bytes", 3 << 20), ("mpsd_prefix_cache_budget_bytes", 64 << 20),
                           ("mpsd_prefix_cache_entries", 2), ("mpsd_prefix_cache_hit_tokens_total", 40),
                           ("mpsd_prefix_cache_miss_tokens_total", 60), ("mpsd_prefix_cache_evictions_total", 1)):
        assert value(scraped, name, model="a", worker="a-0") == expected, name
    assert not any(name.startswith("mpsd_prefix_cache") and ("worker", "a-1") in labels for name, labels in scraped), \
        "prefix_cache '0' (or a backend keeping none): no series"

    fleet._on_exit(cached, cached.process, 1, "")
    assert not any(name.startswith("mpsd_prefix_cache") for name, _ in samples(registry)), "no process, no cache"


def test_each_live_worker_gives_its_memory_by_kind_and_the_model_its_clean_shared_pages_once(tmp_path):
    trees = {4242: ProcessMemory(footprint=2 * GiB, rss=6 * GiB, uss=5 * GiB, pss=4 * GiB, clean_bytes=4 * GiB,
                                 processes=3),
             4343: ProcessMemory(footprint=GiB, rss=5 * GiB, clean_bytes=3 * GiB, processes=3)}
    fleet = make_fleet(tmp_path, memory_of_pid=lambda pid: trees.get(pid, ProcessMemory()))
    for worker, pid in zip(fleet.workers.values(), trees):
        worker.state, worker.process = WorkerState.READY, FakeProcess()
        worker.process.pid = pid
    registry = CollectorRegistry()
    registry.register(FleetCollector(fleet, {}))
    scraped = samples(registry)
    for kind, expected in (("footprint", 2), ("rss", 6), ("uss", 5), ("pss", 4), ("clean", 4)):
        assert value(scraped, "mpsd_worker_memory_bytes", model="a", worker="a-0", kind=kind) == expected * GiB, kind
    assert value(scraped, "mpsd_worker_footprint_bytes", model="a", worker="a-1") == GiB
    assert value(scraped, "mpsd_model_shared_memory_bytes", model="a") == 4 * GiB, "the most one maps, not the sum"
    model = fleet.snapshot().models[0]
    assert (model.shared_bytes, model.shared_by) == (4 * GiB, 2)
