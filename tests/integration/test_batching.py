"""Many streams decoded together by one worker: a real daemon, one demo and one slow worker, real gRPC.

Each worker here is alone in its model (replicas = 1), so every stream of a
test shares one decode batch. What a batch must not change: the text of a
greedy or seeded request, and one request's cancel, deadline or bad input
touching the others. What it must show: several sequences in the worker's
status at once, and a late request joining between steps instead of
waiting for the batch to end. The last test kills the slow worker with a
full batch; it runs last because it restarts that worker.
"""

import os
import signal
import threading
import time

import grpc
import pytest
from mpsd import paths
from mpsd.proto_plain import to_plain
from mpsd.v1 import admin_pb2, admin_pb2_grpc, inference_pb2
from support import Stream, running_daemon, wait_for

DEMO_CONCURRENCY = 16
SLOW_CONCURRENCY = 8
PROMPTS = [
    "The", "The module provides", "In this section we describe how", "A", "Returns the number of",
    "It is a", "When the function is called with an empty list,", "This", "The following example shows",
    "Note that", "If", "The value of the", "See also", "Python", "An object that", "For more information",
]
assert len(PROMPTS) == DEMO_CONCURRENCY


def batching_config(slow_model) -> str:
    # A probe every 0.2 s keeps status fresh enough to see a batch that lasts a second or two.
    return f"""
[daemon]
drain_grace = "20s"
health_interval = "0.2s"

[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = 1
concurrency = {DEMO_CONCURRENCY}
threads = 1
queue = 16

[[models]]
name = "slow"
backend = "torch-lm"
path = "{slow_model}"
replicas = 1
concurrency = {SLOW_CONCURRENCY}
threads = 1
queue = 8
"""


@pytest.fixture(scope="module")
def daemon(demo_model, slow_model, tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("batching"), batching_config(slow_model), 2) as daemon:
        yield daemon


class StatusWatch:
    """Samples one worker's status on its own thread (one admin channel) until stopped."""

    def __init__(self, daemon, worker_id: str) -> None:
        self._channel = grpc.insecure_channel(f"unix:{paths.admin_socket_path(daemon.state_dir)}")
        self._admin = admin_pb2_grpc.AdminStub(self._channel)
        self._worker_id = worker_id
        self._stop = threading.Event()
        self.samples: list[dict] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            status = to_plain(self._admin.Status(admin_pb2.StatusRequest(), timeout=10))
            self.samples.append(next(w for w in status["workers"] if w["id"] == self._worker_id))
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()

    def most(self, field: str) -> int:
        return max((s[field] for s in self.samples), default=0)


def running(daemon, worker_id: str) -> int:
    return daemon.worker(worker_id)["running_sequences"]


def settled(daemon, worker_id: str) -> dict:
    """The worker once its batch is empty, its KV cache given back, and the daemon holds no request for it.

    KV bytes are waited for, not read once: a probe can land between a sequence leaving the batch and the
    engine freeing its rows."""
    return wait_for(lambda: (w := daemon.worker(worker_id))["running_sequences"] == 0 and w["inflight"] == 0
                    and w["kv_bytes"] == 0 and w, 30, f"{worker_id} to be idle with no KV cache")


def others_finish_after(daemon, gone: str, others: list) -> dict:
    """The sequence that left is gone from the batch while the others still stream; they finish; the worker idles."""
    wait_for(lambda: running(daemon, "slow-0") == len(others), 10, f"the {gone} sequence to leave the batch")
    assert all(s.alive for s in others), "the others were still streaming when it left"
    for stream in others:
        stream.join(120)
    return settled(daemon, "slow-0")


def answer(daemon, prompt: str, **fields) -> tuple[list[tuple[int, str]], inference_pb2.Finish]:
    """One Generate call: its tokens as (token_id, text) and its Finish."""
    messages = list(daemon.inference().Generate(
        inference_pb2.GenerateRequest(model="demo", prompt=prompt, **fields), timeout=120))
    assert messages and messages[-1].HasField("finish") and not any(m.HasField("finish") for m in messages[:-1])
    tokens = [(m.token_id, m.text) for m in messages[:-1]]
    assert [m.index for m in messages[:-1]] == list(range(len(tokens)))
    return tokens, messages[-1].finish


def together(daemon, requests: list[tuple[str, dict]]) -> list:
    """All requests at once, each on its own thread released by one barrier; their answers in order."""
    barrier = threading.Barrier(len(requests), timeout=60)
    results: list = [None] * len(requests)

    def one(i: int, prompt: str, fields: dict) -> None:
        barrier.wait()
        try:
            results[i] = answer(daemon, prompt, **fields)
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below, with the others)
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i, p, f)) for i, (p, f) in enumerate(requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a stream hung"
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed
    return results


def test_greedy_streams_batched_on_one_worker_match_each_alone_and_status_shows_the_batch(daemon):
    requests = [(prompt, {"max_tokens": 128, "temperature": 0}) for prompt in PROMPTS]
    alone = [answer(daemon, prompt, **fields) for prompt, fields in requests]
    pid = daemon.worker("demo-0")["pid"]
    watch = StatusWatch(daemon, "demo-0")
    try:
        started = time.monotonic()
        batched = together(daemon, requests)
        batched_s = time.monotonic() - started
    finally:
        watch.stop()
    idle = settled(daemon, "demo-0")
    print(f"\n{len(requests)} greedy streams on one worker: {batched_s:.2f}s together; status saw up to "
          f"{watch.most('running_sequences')} sequences and {watch.most('kv_bytes')} KV bytes in "
          f"{len(watch.samples)} samples; idle: {idle['running_sequences']} sequences, {idle['kv_bytes']} KV bytes")
    for (prompt, _), (tokens, finish), (batched_tokens, batched_finish) in zip(requests, alone, batched):
        assert batched_tokens == tokens, f"{prompt!r}: batched text differs from alone"
        assert (batched_finish.reason, batched_finish.usage.prompt_tokens, batched_finish.usage.completion_tokens) == \
            (finish.reason, finish.usage.prompt_tokens, finish.usage.completion_tokens)
        assert batched_finish.worker_pid == pid
    assert watch.most("running_sequences") > 1, "status showed the worker decoding several sequences at once"
    assert watch.most("kv_bytes") > 0, "status showed the batch's KV cache"
    assert all(s["running_sequences"] <= DEMO_CONCURRENCY for s in watch.samples)
    assert idle["pid"] == pid and idle["restarts"] == 0


def test_seeded_sampling_gives_the_same_tokens_batched_as_alone(daemon):
    requests = [(PROMPTS[i % 4], {"max_tokens": 48, "temperature": 0.8, "seed": 100 + i}) for i in range(8)]
    alone = [answer(daemon, prompt, **fields) for prompt, fields in requests]
    batched = together(daemon, requests)
    assert [tokens for tokens, _ in batched] == [tokens for tokens, _ in alone]
    # The seeds are really in use: one prompt under two seeds samples two different texts.
    assert alone[0][0] != alone[4][0], "same prompt, seeds 100 and 104"


def test_a_cancelled_stream_leaves_the_batch_and_the_others_stream_to_the_end(daemon):
    others = [Stream(daemon, 300).started() for _ in range(3)]
    doomed = Stream(daemon, 1000).started()
    wait_for(lambda: len(doomed.messages) >= 5, 30, "a few tokens of the stream to cancel")
    doomed.cancel()
    doomed.join(10)
    idle = others_finish_after(daemon, "cancelled", others)  # it left the batch, not just the client
    print(f"\ncancel mid-batch after {len(doomed.messages)} tokens: {doomed.summary()}; others: "
          + "; ".join(s.summary() for s in others))
    assert doomed.error.code() == grpc.StatusCode.CANCELLED and len(doomed.tokens) < 1000
    assert all(s.completed for s in others)
    assert idle["restarts"] == 0


def test_a_deadline_passing_mid_batch_ends_only_that_request(daemon):
    others = [Stream(daemon, 300).started() for _ in range(3)]
    late = Stream(daemon, 1000, prompt="A", timeout=3).started()
    late.join(30)
    idle = others_finish_after(daemon, "expired", others)
    print(f"\ndeadline mid-batch: {late.summary()}; others: " + "; ".join(s.summary() for s in others))
    assert late.error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and late.tokens, "it had streamed before its deadline"
    assert all(s.completed for s in others)
    assert idle["restarts"] == 0


def test_a_request_joining_a_running_batch_streams_before_the_batch_ends(daemon):
    long = [Stream(daemon, 300).started() for _ in range(3)]
    joined_at = time.monotonic()
    joiner = Stream(daemon, 10, prompt="In this section we describe how").join(60)
    first_token_s = joiner.first_token_at - joined_at
    for stream in long:
        stream.join(120)
    batch_ended_at = min(s.ended_at for s in long)
    print(f"\njoiner: first token {first_token_s:.2f}s after it was sent, done {batch_ended_at - joiner.ended_at:.1f}s "
          f"before the first long stream ended ({joiner.summary()})")
    assert joiner.completed and all(s.completed for s in long)
    assert joiner.first_token_at < batch_ended_at and joiner.ended_at < batch_ended_at, \
        "it streamed, and finished, while the long streams were still going"


@pytest.mark.parametrize("fields,field,says", [
    ({"prompt": ""}, "prompt", "must not be empty"),
    # Over the 1024-token context: only the worker can tell, on the thread that runs the batch.
    ({"prompt": "word " * 3000}, "prompt", "does not fit the model's context"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"max_tokens": 5000}, "max_tokens", "above the model's limit"),
])
def test_bad_input_fails_alone_while_a_batch_runs(daemon, fields, field, says):
    before = daemon.worker("slow-0")
    batch = [Stream(daemon, 150).started() for _ in range(3)]
    request = {"model": "slow", "prompt": "The", "max_tokens": 5, **fields}
    with pytest.raises(grpc.RpcError) as error:
        list(daemon.inference().Generate(inference_pb2.GenerateRequest(**request), timeout=60))
    assert all(s.alive for s in batch), "the batch was still running when the bad request was answered"
    for stream in batch:
        stream.join(120)
    after = settled(daemon, "slow-0")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(f"{field}:") and says in error.value.details(), error.value.details()
    assert all(s.completed for s in batch), [s.summary() for s in batch]
    assert (after["pid"], after["state"], after["restarts"]) == (before["pid"], "READY", before["restarts"])


def test_kill_9_of_a_worker_with_a_full_batch_ends_every_stream_and_the_worker_is_replaced(daemon):
    """Runs last in this module: it restarts slow-0.

    Six streams have tokens when it dies, two have none (sent while it was stopped), so both endings are certain:
    UNAVAILABLE after tokens, and a retry of the tokenless ones on the replacement."""
    before = daemon.worker("slow-0")
    streaming = [Stream(daemon, 200).started() for _ in range(SLOW_CONCURRENCY - 2)]
    os.kill(before["pid"], signal.SIGSTOP)
    try:
        tokenless = [Stream(daemon, 20) for _ in range(2)]
        wait_for(lambda: daemon.worker("slow-0")["inflight"] == SLOW_CONCURRENCY, 10, "a full batch on slow-0")
    finally:
        os.kill(before["pid"], signal.SIGKILL)
    streams = streaming + tokenless
    for stream in streams:
        stream.join(120)
    replaced = wait_for(lambda: (w := daemon.worker("slow-0"))["state"] == "READY" and w["pid"] != before["pid"] and w,
                        60, "a replacement for slow-0")
    print(f"\nSIGKILL slow-0 under {len(streams)} streams: restarts {replaced['restarts']}; "
          + "; ".join(s.summary() for s in streams))
    for stream in streaming:
        assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE, stream.summary()
        assert "worker slow-0" in stream.error.details() and "SIGKILL" in stream.error.details()
        assert stream.tokens
    for stream in tokenless:
        assert stream.completed, stream.summary()
        assert stream.messages[-1].finish.worker_pid == replaced["pid"], "retried on the replacement"
    assert daemon.log().count("retrying once on another worker") >= len(tokenless)
    assert replaced["restarts"] == before["restarts"] + 1 and "SIGKILL" in replaced["last_exit"]
    assert daemon.generate("The", model="slow", max_tokens=3)[-1].HasField("finish")
