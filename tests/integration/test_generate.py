"""Streaming generation through the real daemon and two real workers of the demo model."""

import threading

import grpc
import pytest

from mpsd.v1 import inference_pb2
from support import wait_for


def split(messages):
    tokens = [m for m in messages if not m.HasField("finish")]
    finals = [m for m in messages if m.HasField("finish")]
    assert len(finals) == 1 and messages[-1] is finals[0], "exactly one final message, last"
    return tokens, finals[0].finish


def test_stream_is_ordered_and_complete(shared_daemon):
    tokens, finish = split(shared_daemon.generate("The module provides", max_tokens=40, temperature=0))
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert finish.usage.completion_tokens == len(tokens) and finish.usage.prompt_tokens > 0
    assert finish.reason in ("length", "stop")
    text = "".join(t.text for t in tokens)
    assert text.strip() and "\ufffd" not in text
    again, _ = split(shared_daemon.generate("The module provides", max_tokens=40, temperature=0))
    assert "".join(t.text for t in again) == text, "greedy decoding is deterministic"


def test_seed_reproduces_sampling_and_stop_sequences_cut(shared_daemon):
    first, _ = split(shared_daemon.generate("The", max_tokens=30, temperature=0.9, seed=11))
    second, _ = split(shared_daemon.generate("The", max_tokens=30, temperature=0.9, seed=11))
    text = "".join(t.text for t in first)
    assert text == "".join(t.text for t in second)
    stop = text.strip().split()[1] if len(text.split()) > 1 else text.strip()[:2]
    cut, finish = split(shared_daemon.generate("The", max_tokens=30, temperature=0.9, seed=11, stop=[stop]))
    assert finish.reason == "stop"
    assert "".join(t.text for t in cut) == text[: text.index(stop)]


def test_two_concurrent_streams_are_served_by_two_worker_pids(shared_daemon):
    barrier = threading.Barrier(2, timeout=60)
    finishes = []

    def stream():
        call = shared_daemon.inference().Generate(
            inference_pb2.GenerateRequest(model="demo", prompt="The", max_tokens=60, temperature=0), timeout=60)
        first = next(call)
        assert not first.HasField("finish")
        barrier.wait()  # both streams are in flight now
        finishes.append([m for m in call if m.HasField("finish")][0].finish)

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(finishes) == 2
    pids = {f.worker_pid for f in finishes}
    assert len(pids) == 2
    assert pids == {w["pid"] for w in shared_daemon.status()["workers"] if w["model"] == "demo"}


def hold_stream(daemon, max_tokens=1000):
    """A stream on the slow model (~100 tokens/s): it keeps its worker busy for seconds."""
    call = daemon.inference().Generate(
        inference_pb2.GenerateRequest(model="slow", prompt="The", max_tokens=max_tokens, temperature=0), timeout=120)
    assert not next(call).HasField("finish")
    return call


def test_full_queue_answers_resource_exhausted_and_queued_requests_are_served(shared_daemon):
    held = [hold_stream(shared_daemon), hold_stream(shared_daemon)]  # both workers busy
    results = []
    queued = [threading.Thread(target=lambda: results.append(shared_daemon.generate("The", model="slow", max_tokens=5)))
              for _ in range(2)]
    try:
        with pytest.raises(grpc.RpcError) as late:  # queued, but its deadline passes first
            list(shared_daemon.inference().Generate(inference_pb2.GenerateRequest(model="slow", prompt="The"), timeout=0.3))
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for t in queued:
            t.start()
        wait_for(lambda: slow_status(shared_daemon)["queued"] == 2, 30, "two queued requests")
        with pytest.raises(grpc.RpcError) as error:
            shared_daemon.generate("The", model="slow", max_tokens=5)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in error.value.details()
    finally:
        for call in held:
            call.cancel()
    for t in queued:
        t.join(60)
    assert len(results) == 2 and all(r[-1].HasField("finish") for r in results), "queued requests were served"


def slow_status(daemon) -> dict:
    return next(m for m in daemon.status()["models"] if m["name"] == "slow")


def total_tokens(daemon) -> int:
    return sum(w["tokens"] for w in daemon.status()["workers"])


def test_client_cancel_stops_the_workers_generation(shared_daemon):
    wait_for(lambda: all(w["inflight"] == 0 for w in shared_daemon.status()["workers"]), 30, "idle workers")
    before = total_tokens(shared_daemon)
    call = hold_stream(shared_daemon, max_tokens=1000)
    for _ in range(5):
        next(call)
    call.cancel()
    wait_for(lambda: all(w["inflight"] == 0 for w in shared_daemon.status()["workers"]), 10, "the slot to be released")
    # The worker's own counter must stop growing, well short of the 1000 asked for.
    settled = wait_for(lambda: _stable_count(shared_daemon), 10, "the token count to settle")
    assert settled - before < 300, f"worker generated {settled - before} tokens after a cancel at ~6"


def _stable_count(daemon):
    first = total_tokens(daemon)
    threading.Event().wait(0.5)
    return first if total_tokens(daemon) == first else None


@pytest.mark.parametrize("fields,code,field", [
    ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, "model"),
    ({"model": ""}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    ({"max_tokens": 0}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"max_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    ({"temperature": -1}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    ({"top_p": 0}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"top_p": 1.5}, grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    ({"prompt": "word " * 3000}, grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
])
def test_bad_input_gets_a_clear_error_and_nothing_else_happens(shared_daemon, fields, code, field):
    before = shared_daemon.status()["workers"]
    fields.setdefault("prompt", "The")
    fields.setdefault("model", "demo")
    with pytest.raises(grpc.RpcError) as error:
        list(shared_daemon.inference().Generate(inference_pb2.GenerateRequest(**fields), timeout=30))
    assert error.value.code() == code
    assert error.value.details().startswith(f"{field}:"), error.value.details()
    after = shared_daemon.status()["workers"]
    assert [(w["pid"], w["state"], w["restarts"]) for w in after] == [(w["pid"], w["state"], w["restarts"]) for w in before]
