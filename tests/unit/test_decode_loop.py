"""Continuous batching in the torch-lm backend: the decode loop over the real demo and ~25M models, in-process.

Each test drives DecodeScheduler the way the worker's RPC threads do (one
thread per client) and checks what a client of a shared batch must see: the
same tokens as alone, its own cancel and deadline, joining without waiting,
long prompts in chunks, and failures (bad input, out of memory) that stay its
own. Out of memory cannot happen here on purpose, so it is injected where the
framework raises it (the model's forward), with the text PyTorch MPS prints.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch")

import torch  # noqa: E402

from mpsd.generate_params import InvalidRequest  # noqa: E402
from mpsd.worker.backends.base import Finished, TokenEvent  # noqa: E402
from mpsd.worker.backends.torch_lm import PREFILL_CHUNK_TOKENS, TorchCausalLM  # noqa: E402
from mpsd.worker.scheduler import DeadlinePassed, OutOfMemory  # noqa: E402

from decoding import Client, params, run, running, started, together, token_ids  # noqa: E402

MPS_OOM = ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). "
           "Tried to allocate 256.00 MB on private pool.")
PROMPTS = ["Hello", "The module provides a way to", "Return the number of items in the sequence when the",
           "A class that", "def main():", "Raise an error if the file"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(demo_model):
    return TorchCausalLM(str(demo_model), "cpu")


@pytest.fixture(scope="module")
def slow(slow_model):
    return TorchCausalLM(str(slow_model), "cpu")


def test_greedy_and_seeded_requests_give_the_same_tokens_batched_as_alone(demo):
    requests = [params(p, 40) for p in PROMPTS] + [params(p, 40, temperature=0.8, top_p=0.9, seed=i)
                                                   for i, p in enumerate(PROMPTS)]
    with running(demo) as scheduler:
        alone = [token_ids(run(scheduler, request)[0]) for request in requests]
        batched = [token_ids(c.events) for c in together(scheduler, requests, stagger_s=0.003)]
        assert max(step.decode_rows for step in scheduler.steps) >= 4, "the requests really shared steps"
    assert batched == alone


def test_cancel_mid_batch_frees_the_slot_and_the_others_keep_streaming(slow):
    with running(slow, 4) as scheduler:
        clients = started(scheduler, [params(p, 30) for p in PROMPTS[:3]])
        _wait(lambda: len(clients[1].events) >= 3, "a few tokens")
        clients[1].submission.cancel()
        for client in clients:
            client.finish()
        assert not any(isinstance(e, Finished) for e in clients[1].events) and len(clients[1].events) < 30
        for client in (clients[0], clients[2]):
            assert client.error is None and client.events[-1].completion_tokens == 30
        _wait(lambda: scheduler.running == 0 and scheduler.kv_bytes == 0, "every sequence's KV cache to be freed")


def test_a_deadline_passing_mid_batch_ends_only_that_request(slow):
    with running(slow, 4) as scheduler:
        others = [Client(scheduler, params(p, 40)) for p in PROMPTS[:2]]
        late = Client(scheduler, params(PROMPTS[2], 900), deadline=time.monotonic() + 0.5)
        for client in (*others, late):
            client.start()
        for client in (*others, late):
            client.finish()
    assert isinstance(late.error, DeadlinePassed) and 0 < len(late.events) < 900
    assert all(c.error is None and c.events[-1].completion_tokens == 40 for c in others)


def test_a_request_joining_a_running_batch_streams_before_the_batch_finishes(slow):
    with running(slow, 4) as scheduler:
        long = started(scheduler, [params(p, 80) for p in PROMPTS[:2]])
        _wait(lambda: len(long[0].events) >= 5, "the batch to be running")
        short = Client(scheduler, params(PROMPTS[3], 5))
        short.start()
        short.finish()
        assert short.events[-1].completion_tokens == 5
        assert all(len(client.events) < 80 for client in long), "the newcomer did not wait for the batch to end"
        for client in long:
            client.finish()


def test_a_long_prompt_joins_in_chunks_and_the_others_get_a_token_every_step(slow):
    long_prompt = " ".join(["the value of the item"] * 160)  # ~800 tokens: several prefill chunks
    with running(slow, 4) as scheduler:
        runner = Client(scheduler, params(PROMPTS[0], 60))
        runner.start()
        _wait(lambda: len(runner.events) >= 3, "a running stream")
        first_step = len(scheduler.steps)
        joiner = Client(scheduler, params(long_prompt, 5))
        joiner.start()
        joiner.finish()
        runner.finish()
        steps = list(scheduler.steps)[first_step:]
    prefilling = [step for step in steps if step.prefill_tokens]
    assert len(prefilling) >= 3, "the prompt was prefilled over several steps"
    assert all(step.prefill_tokens <= PREFILL_CHUNK_TOKENS for step in prefilling)
    assert all(step.decode_rows >= 1 for step in prefilling), "every prefill step also decoded the running stream"
    assert joiner.error is None and runner.events[-1].completion_tokens == 60


def test_bad_input_fails_alone_while_the_batch_goes_on(demo):
    with running(demo, 4) as scheduler:
        good = started(scheduler, [params(p, 40) for p in PROMPTS[:2]])
        with pytest.raises(InvalidRequest, match="^prompt: .* does not fit the model's context"):
            list(scheduler.submit(params("hello " * 2000)))
        with pytest.raises(InvalidRequest, match="^max_tokens: "):
            list(scheduler.submit(params("Hello", 100_000)))
        for client in good:
            client.finish()
    assert all(c.error is None and c.events[-1].completion_tokens == 40 for c in good)


class OomAtPrefill(TorchCausalLM):
    """Runs out of memory in any forward that prefills a prompt mentioning 'memory hog' (alone or beside others)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        model = self._model

        def forward(**inputs):
            rows = inputs["input_ids"].tolist()
            if len(rows[0]) > 1 and any("memory hog" in self.decode(row) for row in rows):
                raise RuntimeError(MPS_OOM)
            return model(**inputs)

        self._model = forward


class OomAtThreeRows(TorchCausalLM):
    """Runs out of memory the first time a decode step holds three sequences, after the forward grew the cache."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        model, self.failed = self._model, False

        def forward(**inputs):
            result = model(**inputs)
            if inputs["input_ids"].shape[0] == 3 and not self.failed:
                self.failed = True
                raise RuntimeError(MPS_OOM)
            return result

        self._model = forward


def test_out_of_memory_in_one_prefill_fails_that_request_only(demo_model):
    with running(OomAtPrefill(str(demo_model), "cpu"), 4) as scheduler:
        good = [Client(scheduler, params(p, 30)) for p in PROMPTS[:2]]
        hog = Client(scheduler, params("a memory hog of a prompt", 30))
        for client in (*good, hog):
            client.start()
        for client in (*good, hog):
            client.finish()
    assert isinstance(hog.error, OutOfMemory) and "PyTorch MPS ran out of memory" in str(hog.error)
    assert all(c.error is None and c.events[-1].completion_tokens == 30 for c in good)


def test_out_of_memory_in_a_decode_step_fails_the_youngest_and_the_rest_continue_unchanged(demo, demo_model):
    requests = [params(p, 100) for p in PROMPTS[:3]]
    with running(demo) as scheduler:
        alone = [token_ids(run(scheduler, request)[0]) for request in requests]
    with running(OomAtThreeRows(str(demo_model), "cpu")) as scheduler:
        clients = together(scheduler, requests)
    failed = [c for c in clients if c.error is not None]
    assert len(failed) == 1 and isinstance(failed[0].error, OutOfMemory)
    assert failed[0] is clients[2], "the youngest sequence gave its memory back"
    for client, expected in zip(clients[:2], alone[:2]):
        assert token_ids(client.events) == expected, "the step was undone cleanly and repeated"


def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def test_token_events_and_finish_follow_the_budget(demo):
    with running(demo) as scheduler:
        events, done = run(scheduler, params("Hello", 7))
    assert [e.index for e in events] == list(range(7)) and all(isinstance(e, TokenEvent) for e in events)
    assert done.reason == "length" and done.completion_tokens == 7
