"""The mlx-lm prefix cache: MlxPrefixCache's own rules on hand-made caches, then the engine reusing a conversation's KV
through the decode loop (the tiny random-weight MLX model, on the MLX CPU backend on Linux).

The promise to clients is that reuse changes nothing but time: with greedy or
seeded sampling, a turn served from the cache gets the tokens it would get
prefilled from scratch, alone and inside a full batch. Out of memory cannot
happen here on purpose, so it is injected where a cached prefix is copied,
with the text MLX's Metal allocator raises.

One decode loop for the module: MLX streams belong to the thread that made
them, so the engine stays with one scheduler thread; budgets change through it.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx
from decoding import params, run, running, together, token_ids
from mlx_lm.models.cache import KVCache
from mpsd.demo.mlx_model import build_mlx_demo_model
from mpsd.oom import exception_oom
from mpsd.worker.backends.mlx_lm import MlxCausalLM, MlxPrefixCache
from mpsd.worker.scheduler import OutOfMemory

MAX_SEQUENCES = 4
ON = 1 << 30
METAL_OOM = "[metal::malloc] Resource limit (499000) exceeded."
HISTORY = "You are a careful assistant. Tools: search(query), open(url). Answer briefly, cite the tool. " * 2
TURN = "User: what does the module provide?\nAssistant:"
MORE = "\nUser: and how is the file read?\nAssistant:"
SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 7}


# -- the adapter alone: caches of 1 layer, 16 bytes per token ------------

def _cache(tokens: int) -> list:
    layer = KVCache()
    layer.update_and_fetch(mx.zeros((1, 1, tokens, 2)), mx.zeros((1, 1, tokens, 2)))
    return [KVCache.from_state((layer.keys[..., :tokens, :], layer.values[..., :tokens, :], tokens))]


def _store(budget: int = 1000) -> MlxPrefixCache:
    return MlxPrefixCache(mx, "m", budget)


def test_a_hit_always_leaves_the_last_token_and_a_longer_entry_is_cut():
    store = _store()
    store.insert([1, 2, 3, 4], _cache(4))
    cache, rest = store.fetch([1, 2, 3, 4])
    assert (cache[0].offset, rest) == (3, [4]), "an exact hit: the last token is prefilled again"
    cache, rest = store.fetch([1, 2, 9])
    assert (cache[0].offset, rest) == (2, [9]), "a longer entry, cut to the common part"
    cache, rest = store.fetch([1, 2, 3, 4, 5, 6])
    assert (cache[0].offset, rest) == (4, [5, 6])
    assert store.fetch([7, 1]) == (None, [7, 1])
    assert store.fetch([1, 2, 3, 4])[0][0].offset == 3, "the entry itself was not cut: fetch copies"


def test_extending_a_run_replaces_it_and_the_budget_evicts_the_oldest():
    store = _store(budget=16 * 9)
    store.insert([1, 2], _cache(2))
    store.insert([1, 2, 3, 4], _cache(4))
    assert (len(store), store.bytes, store.evictions) == (1, 64, 0), "a replaced prefix is no eviction"
    store.insert([5, 6, 7], _cache(3))
    store.insert([8, 9, 10], _cache(3))
    assert (len(store), store.bytes, store.evictions) == (2, 96, 1)
    assert store.fetch([1, 2, 3, 4, 0])[0] is None, "the least recently stored went first"
    store.insert([11] * 11, _cache(11))
    assert len(store) == 2 and store.bytes == 96, "an entry larger than the whole budget is not kept"
    store.set_budget(50)
    assert (len(store), store.bytes, store.evictions) == (1, 48, 2)
    assert store.clear() == 1 and store.bytes == 0 and len(store) == 0 and store.evictions == 3
    store.set_budget(0)
    store.insert([1], _cache(1))
    assert len(store) == 0


def test_the_injected_error_reads_as_mlx_out_of_memory():
    assert exception_oom(RuntimeError(METAL_OOM)) == "MLX could not allocate Metal memory"


# -- the engine, in-process ----------------------------------------------

@pytest.fixture(scope="module")
def engine(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx") / "mlx-demo"
    build_mlx_demo_model(out, progress=lambda _line: None, tokenizer_dir=demo_model)
    return MlxCausalLM(str(out), None, None, None, max_sequences=MAX_SEQUENCES)


@pytest.fixture(scope="module")
def loop(engine):
    with running(engine, MAX_SEQUENCES) as scheduler:
        yield scheduler


@pytest.fixture
def scheduler(loop):
    """The module's loop with an empty prefix cache, budget 0 (off) until the test sets one."""
    _budget(loop, 0)
    yield loop
    _budget(loop, 0)


def _budget(scheduler, budget_bytes: int) -> None:
    """Applied by the scheduler thread before its next step; waits until its figures show it."""
    scheduler.set_prefix_cache_budget(budget_bytes)
    _until(lambda: scheduler.prefix_cache.budget_bytes == budget_bytes and (budget_bytes or not scheduler.prefix_cache.entries))


def _idle(scheduler) -> None:
    """A finished sequence's KV reaches the cache just after its Finished event: wait for the loop to let it go."""
    _until(lambda: scheduler.running == 0)


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the scheduler did not get there"
        time.sleep(0.002)


def _two_turns(scheduler, engine, sampling: dict):
    """A first turn, then the second: the first's prompt, its answer as text, and a new message."""
    first, _ = run(scheduler, params(HISTORY + TURN, 8, **sampling))
    _idle(scheduler)
    second = params(HISTORY + TURN + engine.decode(token_ids(first)) + MORE, 8, **sampling)
    events, done = run(scheduler, second)
    _idle(scheduler)
    return token_ids(first), token_ids(events), done


@pytest.mark.parametrize("sampling", [{}, SEEDED], ids=["greedy", "seeded"])
def test_a_second_turn_gives_the_same_tokens_with_the_cache_as_without(scheduler, engine, sampling):
    without = _two_turns(scheduler, engine, sampling)
    _budget(scheduler, ON)
    hits_before = scheduler.prefix_cache.hit_tokens
    scheduler.steps.clear()
    with_cache = _two_turns(scheduler, engine, sampling)
    assert with_cache[:2] == without[:2]
    done_off, done_on = without[2], with_cache[2]
    assert done_off.cached_tokens == 0 and done_on.cached_tokens > len(engine.encode(HISTORY)), done_on
    assert scheduler.prefix_cache.hit_tokens - hits_before == done_on.cached_tokens
    # BatchGenerator counts a prompt's last token in its first decode step, not as prefill.
    prefilled = sum(step.prefill_tokens for step in scheduler.steps)
    first_prompt = len(engine.encode(HISTORY + TURN))
    assert prefilled == first_prompt - 1 + done_on.prompt_tokens - done_on.cached_tokens - 1, "only the rest prefills"


def test_the_entry_is_the_prompt_and_every_token_returned(scheduler, engine):
    _budget(scheduler, ON)
    events, done = run(scheduler, params(HISTORY + TURN, 6, **SEEDED))
    _idle(scheduler)
    held = done.prompt_tokens + len(events)
    figures = scheduler.prefix_cache
    assert figures.entries == 1 and figures.bytes == engine.kv_bytes_per_token * held
    again = params(engine.decode(engine.encode(HISTORY + TURN) + token_ids(events)) + MORE, 4)
    _, done = run(scheduler, again)
    # The answer is served too; its last token may merge with the new text's first when encoded again.
    assert held - 1 <= done.cached_tokens <= held, (held, done)


def test_a_turn_served_from_the_cache_inside_a_full_batch_matches_its_solo_run(scheduler, engine):
    _budget(scheduler, ON)
    first, _ = run(scheduler, params(HISTORY + TURN, 6, **SEEDED))
    second = params(HISTORY + TURN + engine.decode(token_ids(first)) + MORE, 8, **SEEDED)
    others = [params(f"Session {i}: " + HISTORY, 40, temperature=0.7 * (i % 2), seed=i) for i in range(MAX_SEQUENCES - 1)]
    _idle(scheduler)
    scheduler.steps.clear()
    clients = together(scheduler, [*others, second], stagger_s=0.002)  # the second joins a running batch
    assert max(step.decode_rows for step in scheduler.steps) == MAX_SEQUENCES, "the batch was full"
    assert clients[-1].events[-1].cached_tokens > len(engine.encode(HISTORY))
    _budget(scheduler, 0)
    solo = [token_ids(run(scheduler, request)[0]) for request in [*others, second]]
    assert [token_ids(client.events) for client in clients] == solo


def test_a_small_budget_evicts_and_a_budget_of_zero_empties_it(scheduler, engine):
    prompts = [f"Conversation {i}. " + HISTORY for i in range(4)]
    per_entry = engine.kv_bytes_per_token * (max(len(engine.encode(p)) for p in prompts) + 4)
    _budget(scheduler, per_entry * 2)
    for prompt in prompts:
        run(scheduler, params(prompt, 4))
    _idle(scheduler)
    figures = scheduler.prefix_cache
    assert figures.evictions >= 2 and 0 < figures.bytes <= per_entry * 2 and figures.entries == 2, figures
    _budget(scheduler, 0)
    assert scheduler.prefix_cache.bytes == 0 and scheduler.prefix_cache.entries == 0
    _, done = run(scheduler, params(prompts[-1], 4))
    assert done.cached_tokens == 0


def test_out_of_memory_copying_a_cached_prefix_fails_only_that_request_and_frees_the_cache(scheduler, engine,
                                                                                           monkeypatch):
    _budget(scheduler, ON)
    run(scheduler, params(HISTORY + TURN, 4))
    _idle(scheduler)
    assert scheduler.prefix_cache.entries == 1

    def no_memory(prompt_ids):
        raise RuntimeError(METAL_OOM)

    monkeypatch.setattr(engine.prefix_cache, "fetch", no_memory)
    with pytest.raises(OutOfMemory, match="MLX could not allocate Metal memory"):
        run(scheduler, params(HISTORY + TURN + " more", 4))
    _idle(scheduler)
    assert scheduler.prefix_cache.entries == 0 and scheduler.prefix_cache.bytes == 0
    assert scheduler.prefix_cache.evictions >= 1
    monkeypatch.undo()
    _, done = run(scheduler, params(HISTORY + TURN + " more", 4))
    assert done.completion_tokens == 4 and done.cached_tokens == 0
