"""The Prometheus endpoint of a real daemon (two demo and two slow workers): every figure is there and moves with traffic."""

import os
import signal
import threading
import urllib.error
import urllib.request

import grpc
import mpsd
import pytest
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.v1 import inference_pb2
from prometheus_client.parser import text_string_to_metric_families
from support import wait_for

FAMILIES = {
    "mpsd_requests", "mpsd_generated_tokens", "mpsd_time_to_first_token_seconds", "mpsd_inter_token_seconds",
    "mpsd_request_duration_seconds", "mpsd_build_info", "mpsd_queue_depth", "mpsd_inflight_requests", "mpsd_workers",
    "mpsd_worker_restarts", "mpsd_worker_ooms", "mpsd_model_footprint_bytes", "mpsd_worker_footprint_bytes",
    "mpsd_memory_headroom_bytes", "mpsd_memory_budget_bytes", "mpsd_memory_used_bytes", "mpsd_memory_available_bytes",
    "mpsd_memory_free_for_workers_bytes", "process_resident_memory_bytes",
}
METAL_OOM_LINE = ("[METAL] Command buffer execution failed: Insufficient Memory "
                  "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)\n")


class Scrape:
    def __init__(self, daemon) -> None:
        with urllib.request.urlopen(daemon.metrics_url, timeout=10) as response:
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = response.read().decode()
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = {(s.name, frozenset(s.labels.items())): s.value for f in self.families.values() for s in f.samples}

    def __call__(self, name: str, **labels) -> float:
        """A sample's value; 0 for a labelled series not created yet (a code no request has ended with)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def since(self, before: "Scrape", name: str, **labels) -> float:
        """How far a figure moved from the earlier scrape to this one."""
        return self(name, **labels) - before(name, **labels)


def scrape_until(daemon, condition, what: str) -> Scrape:
    def scrape_if_so() -> Scrape | None:
        scrape = Scrape(daemon)
        return scrape if condition(scrape) else None
    return wait_for(scrape_if_so, 30, what)


def test_every_figure_is_served_and_shows_the_fleet_as_it_is(shared_daemon):
    scrape = Scrape(shared_daemon)
    assert FAMILIES <= set(scrape.families), FAMILIES - set(scrape.families)
    for model in ("demo", "slow"):
        assert scrape("mpsd_workers", model=model, state="READY") == 2
        assert all(scrape.has("mpsd_workers", model=model, state=s.value) for s in WorkerState), "0s are listed too"
        assert scrape("mpsd_queue_depth", model=model) == 0 and scrape("mpsd_inflight_requests", model=model) == 0
        assert sum(v for (name, labels), v in scrape.samples.items()
                   if name == "mpsd_model_footprint_bytes" and ("model", model) in labels) > 0
    for worker in shared_daemon.status()["workers"]:
        assert scrape("mpsd_worker_footprint_bytes", model=worker["model"], worker=worker["id"]) > 0
    assert scrape("mpsd_memory_budget_bytes") > 0 and scrape("mpsd_memory_used_bytes") > 0
    assert scrape("mpsd_build_info", version=mpsd.__version__) == 1
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(shared_daemon.metrics_url.replace("/metrics", "/other"), timeout=10)
    assert missing.value.code == 404


def test_requests_tokens_and_token_timing_move_by_exactly_what_was_streamed(shared_daemon):
    before = Scrape(shared_daemon)
    streams = [shared_daemon.generate("The module", max_tokens=n, temperature=0) for n in (4, 9, 16)]
    tokens = [sum(not m.HasField("finish") for m in stream) for stream in streams]
    for request, code in ((inference_pb2.GenerateRequest(model="nope", prompt="The"), grpc.StatusCode.NOT_FOUND),
                          (inference_pb2.GenerateRequest(model="demo", prompt="The", top_p=2), grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as refused:
            list(shared_daemon.inference().Generate(request, timeout=30))
        assert refused.value.code() == code
    after = Scrape(shared_daemon)
    moved = lambda name, **labels: after.since(before, name, **labels)  # noqa: E731
    assert all(tokens), tokens
    assert moved("mpsd_requests_total", model="demo", method="Generate", protocol="grpc", code="OK") == 3
    assert moved("mpsd_requests_total", model="(unknown)", method="Generate", protocol="grpc", code="NOT_FOUND") == 1
    assert moved("mpsd_requests_total", model="demo", method="Generate", protocol="grpc", code="INVALID_ARGUMENT") == 1
    assert moved("mpsd_request_duration_seconds_count", model="demo", method="Generate", protocol="grpc") == 4
    assert moved("mpsd_generated_tokens_total", model="demo") == sum(tokens)
    assert moved("mpsd_time_to_first_token_seconds_count", model="demo") == 3
    assert moved("mpsd_inter_token_seconds_count", model="demo") == sum(tokens) - 3
    assert moved("mpsd_time_to_first_token_seconds_sum", model="demo") > 0
    assert moved("mpsd_inter_token_seconds_sum", model="demo") > 0
    assert moved("mpsd_generated_tokens_total", model="slow") == 0


def test_in_flight_and_queue_depth_follow_busy_workers_and_cancels_are_counted(shared_daemon):
    before = Scrape(shared_daemon)
    held = []
    for _ in range(2):  # both slow workers busy for seconds
        call = shared_daemon.inference().Generate(
            inference_pb2.GenerateRequest(model="slow", prompt="The", max_tokens=1000, temperature=0), timeout=120)
        assert not next(call).HasField("finish")
        held.append(call)
    queued = threading.Thread(target=lambda: shared_daemon.generate("The", model="slow", max_tokens=3))
    queued.start()
    try:
        busy = scrape_until(shared_daemon, lambda s: s("mpsd_queue_depth", model="slow") == 1, "the queued request")
        assert busy("mpsd_inflight_requests", model="slow") == 2
    finally:
        for call in held:
            call.cancel()
        queued.join(60)
    slow = {"model": "slow", "method": "Generate", "protocol": "grpc"}
    after = scrape_until(shared_daemon, lambda s: s.since(before, "mpsd_requests_total", code="CANCELLED", **slow) == 2,
                         "both cancels counted")
    assert after("mpsd_queue_depth", model="slow") == 0 and after("mpsd_inflight_requests", model="slow") == 0
    assert after.since(before, "mpsd_requests_total", code="OK", **slow) == 1


def test_a_restart_and_an_oom_death_are_counted_for_their_model(shared_daemon):
    """Last in this module: it leaves a slow worker OOM."""
    before = Scrape(shared_daemon)
    killed = shared_daemon.worker("slow-1")
    os.kill(killed["pid"], signal.SIGKILL)
    restarted = scrape_until(shared_daemon, lambda s: s("mpsd_workers", model="slow", state="READY") == 2 and
                             s.since(before, "mpsd_worker_restarts_total", model="slow") > 0, "slow-1 restarted")
    assert restarted.since(before, "mpsd_worker_restarts_total", model="slow") == 1
    assert restarted.since(before, "mpsd_worker_restarts_total", model="demo") == 0
    assert restarted.since(before, "mpsd_worker_ooms_total", model="slow", kind="exit") == 0
    oomed = shared_daemon.worker("slow-0")
    with open(f"/proc/{oomed['pid']}/fd/2", "w") as stderr:  # what Metal prints before it aborts the process
        stderr.write(METAL_OOM_LINE)
    os.kill(oomed["pid"], signal.SIGABRT)
    # Waits on the counter, not on the OOM gauge: the shared host's free memory may move enough for a retry.
    after = scrape_until(shared_daemon, lambda s: s.since(restarted, "mpsd_worker_ooms_total", model="slow", kind="exit") > 0,
                         "slow-0's OOM exit counted")
    assert after.since(restarted, "mpsd_worker_ooms_total", model="slow", kind="exit") == 1
    assert after.since(restarted, "mpsd_worker_ooms_total", model="slow", kind="in_request") == 0
