"""The hop between a worker and the daemon: one Steps stream per worker, one message per decode step.

A real daemon and one null-lm worker (zero compute, so steps come as fast as
the hop carries them), its stream_buffer made small so a client that stops
reading overruns it in a moment. Worker deaths under a full batch are in
test_batching and tests/reliability; cancels and deadlines in test_generate.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import grpc
import pytest

from mpsd.v1 import inference_pb2, inference_pb2_grpc
from support import Stream, metric, running_daemon, wait_for

STREAM_BUFFER = 256  # a message carries about 16 tokens per stream here: far below it
CONFIG = f"""
[daemon]
stream_buffer = {STREAM_BUFFER}

[[models]]
name = "null"
backend = "null-lm"
replicas = 1
concurrency = 16
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("hop"), CONFIG, 1) as daemon:
        yield daemon


def _worker(daemon) -> dict:
    return daemon.worker("null-0")


def test_sixteen_streams_share_each_steps_message(daemon):
    """16 streams of 300 tokens: every stream gets all its tokens, and the worker sent them in far fewer messages
    than tokens (one message per step carries every row; per-token messages would make the ratio 1)."""
    before = wait_for(lambda: (w := _worker(daemon))["inflight"] == 0 and w, 10, "an idle worker")
    streams = [Stream(daemon, 300, model="null") for _ in range(16)]
    for stream in streams:
        stream.join(60)
    assert all(stream.completed for stream in streams), [s.summary() for s in streams if not s.completed]
    after = wait_for(lambda: (w := _worker(daemon))["tokens"] >= before["tokens"] + 16 * 300 and w, 10,
                     "the worker's counters to include the streams")
    tokens = after["tokens"] - before["tokens"]
    messages = after["step_messages"] - before["step_messages"]
    print(f"\n16 streams x 300 tokens: {tokens} tokens in {messages} Steps messages ({tokens / messages:.1f} per message)")
    assert tokens == 16 * 300
    assert tokens / messages >= 4, f"{tokens} tokens in {messages} messages: the hop is not carrying steps"


def test_a_client_that_stops_reading_is_cut_alone_and_the_batch_goes_on(daemon):
    """A gRPC client that reads nothing fills its transport's window, then stream_buffer tokens in the daemon:
    that stream alone is cut (RESOURCE_EXHAUSTED naming stream_buffer, once it reads again), its worker stops
    generating for it, and a stream beside it on the same worker is served whole meanwhile."""
    exhausted = metric(daemon, "mpsd_requests_total", model="null", method="Generate", protocol="grpc",
                       code="RESOURCE_EXHAUSTED")
    channel = grpc.insecure_channel(daemon.address, options=[("grpc.http2.bdp_probe", 0)])  # a fixed 64 KiB window
    stalled = inference_pb2_grpc.InferenceStub(channel).Generate(
        inference_pb2.GenerateRequest(model="null", prompt="The", max_tokens=500_000), timeout=120)
    try:
        wait_for(lambda: _worker(daemon)["running_sequences"] == 1, 10, "the unread stream to be generating")
        bystander = Stream(daemon, 2000, model="null")
        bystander.join(60)
        assert bystander.completed, bystander.summary()
        wait_for(lambda: _worker(daemon)["running_sequences"] == 0, 10, "the worker to stop generating for it")
        read, error = 0, None
        try:
            for _ in stalled:
                read += 1
        except grpc.RpcError as exc:
            error = exc
    finally:
        channel.close()
    assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, f"{read} read, then {error}"
    assert "stream_buffer" in error.details() and "read too slowly" in error.details()
    assert read < 500_000
    wait_for(lambda: metric(daemon, "mpsd_requests_total", model="null", method="Generate", protocol="grpc",
                            code="RESOURCE_EXHAUSTED") == exhausted + 1, 10, "the cut counted RESOURCE_EXHAUSTED")
    print(f"\nunread stream: cut after {read} tokens reached the client ({error.details()}); {bystander.summary()}")


def test_a_cancel_on_the_shared_stream_stops_only_that_sequence(daemon):
    """Cancelling one of two streams tells the worker over the shared stream: it drops that sequence alone."""
    kept, dropped = Stream(daemon, 200_000, model="null").started(), Stream(daemon, 200_000, model="null").started()
    wait_for(lambda: _worker(daemon)["running_sequences"] == 2, 10, "two sequences running")
    dropped.cancel()
    dropped.join(10)
    wait_for(lambda: _worker(daemon)["running_sequences"] == 1, 10, "the cancelled sequence to leave the batch")
    time.sleep(0.3)
    assert kept.alive and kept.error is None, kept.summary()
    kept.cancel()
    kept.join(10)
    wait_for(lambda: _worker(daemon)["running_sequences"] == 0, 10, "the batch to empty")


def test_a_deadline_ends_the_request_in_the_daemon_when_its_worker_cannot_answer(daemon):
    """An HTTP request with X-Request-Timeout to a worker that is stopped (SIGSTOP, shorter than the health timeout):
    the daemon's own timer answers 504 at the deadline, without waiting for the worker or its health probe."""
    pid = _worker(daemon)["pid"]
    body = json.dumps({"model": "null", "prompt": "The", "max_tokens": 5}).encode()
    request = urllib.request.Request(f"{daemon.http_url}/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "X-Request-Timeout": "0.5"})
    os.kill(pid, signal.SIGSTOP)
    try:
        sent = time.monotonic()
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(request, timeout=10)
        waited = time.monotonic() - sent
    finally:
        os.kill(pid, signal.SIGCONT)
    assert answered.value.code == 504 and "deadline" in answered.value.read().decode()
    assert waited < 3, f"answered after {waited:.1f}s"
    wait_for(lambda: (w := _worker(daemon))["state"] == "READY" and w["pid"] == pid and w["inflight"] == 0, 10,
             "the same worker back, running nothing")


def test_a_dead_workers_sockets_are_removed_when_it_is_replaced(daemon):
    """Runs last: kills null-0. Its gRPC and Steps sockets go with it; the replacement has a pair of its own."""
    run_dir = daemon.state_dir / "run"
    before = {p.name for p in run_dir.iterdir()}
    pid = _worker(daemon)["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (w := _worker(daemon))["state"] == "READY" and w["pid"] != pid, 60, "a replacement for null-0")
    wait_for(lambda: not before & {p.name for p in run_dir.iterdir()}, 10, "the dead worker's sockets to be removed")
    after = sorted(p.suffix for p in run_dir.iterdir())
    assert after == [".sock", ".steps"], after
    assert daemon.generate("The", model="null", max_tokens=3)[-1].HasField("finish")
