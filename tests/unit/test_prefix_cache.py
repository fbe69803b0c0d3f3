"""The prefix cache: the store's own rules (pure), then torch-lm reusing a conversation's KV in-process.

The promise to clients is that reuse changes nothing but time: with greedy or
seeded sampling, a turn served from the cache gets the tokens it would get
prefilled from scratch, alone and inside a full batch. Out of memory cannot
happen here on purpose, so it is injected where the copy of a cached prefix
is made, with the text PyTorch MPS prints.
"""

from __future__ import annotations

import pytest

from mpsd.worker.prefix_store import PrefixStore, common_prefix_length, resolve_budget

from decoding import params, run, running, together, token_ids, wait_idle


def _store(budget: int = 100) -> PrefixStore:
    return PrefixStore(budget, nbytes=len)  # payloads are strings here: one byte per character


def test_lookup_takes_the_longest_common_prefix_and_always_leaves_the_last_token_to_prefill():
    store = _store()
    store.insert([1, 2, 3], "abc")
    store.insert([1, 2, 9, 9, 9], "abxyz")
    match = store.lookup([1, 2, 9, 9, 4, 5])
    assert (match.tokens, match.reuse) == ((1, 2, 9, 9, 9), 4), "a longer entry is cut to the common part"
    assert store.lookup([1, 2, 3]).reuse == 2, "the whole prompt cached: its last token is still prefilled"
    assert store.lookup([7, 1, 2]) is None and store.lookup([1]) is None


def test_inserting_a_longer_run_drops_the_entries_it_extends():
    store = _store()
    store.insert([1, 2], "ab")
    store.insert([1, 2, 3, 4], "abcd")
    store.insert([5], "e")
    assert len(store) == 2 and store.bytes == 5
    assert store.lookup([1, 2, 3, 4, 8]).tokens == (1, 2, 3, 4)


def test_least_recently_used_goes_first_and_the_budget_holds():
    store = _store(budget=10)
    store.insert([1], "aaaa")
    store.insert([2], "bbbb")
    store.lookup([1, 0])  # 1 is now the most recently used
    store.insert([3], "cccc")
    assert store.lookup([2, 0]) is None and store.lookup([1, 0]) is not None
    assert store.bytes == 8 <= store.budget_bytes and store.evictions == 1
    store.insert([4], "x" * 11)
    assert store.lookup([4, 0]) is None, "an entry larger than the whole budget is not kept"
    store.set_budget(4)
    assert store.bytes <= 4 and len(store) == 1 and store.evictions == 2
    assert store.clear() == 1 and store.bytes == 0 and store.evictions == 3


def test_common_prefix_length_and_budget_resolution():
    assert [common_prefix_length(a, b) for a, b in [((), (1,)), ((1, 2), (1, 2)), ((1, 2, 3), (1, 2, 4)),
                                                      ((5,), (6,)), (tuple(range(5000)), tuple(range(4000)))]] == [
        0, 2, 2, 0, 4000]
    assert resolve_budget(1 << 20, None, 10) == 1 << 20
    assert resolve_budget(None, 0.25, 1000) == 250 and resolve_budget(None, None, 1000) == 0


# -- torch-lm, in-process ------------------------------------------------

torch = pytest.importorskip("torch")

from mpsd.worker.backends import torch_lm  # noqa: E402
from mpsd.worker.scheduler import OutOfMemory  # noqa: E402

MPS_OOM = ("MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). "
           "Tried to allocate 256.00 MB on private pool.")
HISTORY = ("You are a careful assistant. Tools: search(query), open(url), summarize(text). "
           "Answer briefly and cite the tool you used. ") * 4
TURNS = ["User: what does the module provide?\nAssistant:", "User: and how is the file read?\nAssistant:",
         "User: name one class.\nAssistant:"]
ON = 1 << 30


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def demo(demo_model):
    return torch_lm.TorchCausalLM(str(demo_model), "cpu")


def _conversation(scheduler, engine, first_turn: str, sampling: dict) -> tuple[list[list[int]], list[int]]:
    """Three turns, each prompt the whole history so far: token ids and cached tokens of every turn."""
    history, answers, cached = HISTORY, [], []
    for turn in TURNS:
        history += first_turn + turn if not answers else turn
        events, done = run(scheduler, params(history, 12, **sampling))
        answers.append(token_ids(events))
        cached.append(done.cached_tokens)
        history += engine.decode(answers[-1]) + "\n"
    return answers, cached


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 7}], ids=["greedy", "seeded"])
def test_a_conversation_gives_the_same_tokens_with_the_cache_as_without(demo, sampling):
    with running(demo) as scheduler:
        without, cached_off = _conversation(scheduler, demo, "", sampling)
    with running(demo, prefix_cache_bytes=ON) as scheduler:
        with_cache, cached_on = _conversation(scheduler, demo, "", sampling)
        figures = wait_idle(scheduler).prefix_cache
    assert with_cache == without
    assert cached_off == [0, 0, 0] and cached_on[0] == 0 and all(c > 100 for c in cached_on[1:]), cached_on
    assert figures.hit_tokens == sum(cached_on) and figures.entries >= 1 and 0 < figures.bytes <= ON


def test_turns_served_from_the_cache_inside_a_full_batch_match_their_solo_runs(demo):
    """Eight conversations' second turns at once, each starting from its own first turn's KV."""
    openers = [f"Session {i}: " for i in range(8)]
    firsts = [params(HISTORY + o + TURNS[0], 10, seed=i, temperature=0.7 if i % 2 else 0.0) for i, o in enumerate(openers)]
    with running(demo, prefix_cache_bytes=ON) as scheduler:
        first_answers = [token_ids(run(scheduler, p)[0]) for p in firsts]
        seconds = [params(p.prompt + demo.decode(a) + "\n" + TURNS[1], 10, seed=p.seed, temperature=p.temperature)
                   for p, a in zip(firsts, first_answers)]
        clients = together(scheduler, seconds)
        assert max(step.decode_rows for step in scheduler.steps) >= 4, "the turns really shared steps"
    with running(demo) as scheduler:
        solo = [token_ids(run(scheduler, p)[0]) for p in seconds]
    assert [token_ids(c.events) for c in clients] == solo
    assert all(c.events[-1].cached_tokens > len(demo.encode(HISTORY)) for c in clients)


def test_a_hit_prefills_only_what_is_new(demo):
    prompt = HISTORY + TURNS[0]
    with running(demo, prefix_cache_bytes=ON) as scheduler:
        events, _ = run(scheduler, params(prompt, 6))
        scheduler.steps.clear()
        second = prompt + demo.decode(token_ids(events)) + TURNS[1]
        _, done = run(scheduler, params(second, 6))
        prefilled = sum(step.prefill_tokens for step in scheduler.steps)
    assert prefilled == done.prompt_tokens - done.cached_tokens and done.cached_tokens > 0


def test_a_small_budget_evicts_least_recently_used_and_holds(demo):
    per_entry = demo.kv_bytes_per_token * (len(demo.encode(HISTORY)) + 20)
    with running(demo, prefix_cache_bytes=per_entry * 2) as scheduler:
        for i in range(4):
            run(scheduler, params(f"Conversation {i}. " + HISTORY, 4))
        figures = wait_idle(scheduler).prefix_cache
        assert figures.evictions >= 2 and figures.bytes <= per_entry * 2 and figures.entries <= 2
        scheduler.set_prefix_cache_budget(0)
        _, done = run(scheduler, params("Conversation 3. " + HISTORY, 4))
        assert done.cached_tokens == 0 and wait_idle(scheduler).prefix_cache.bytes == 0


def test_out_of_memory_copying_a_cached_prefix_frees_the_cache_and_fails_only_that_request(demo, monkeypatch):
    prompt = HISTORY + TURNS[0]
    with running(demo, prefix_cache_bytes=ON) as scheduler:
        run(scheduler, params(prompt, 6))
        assert wait_idle(scheduler).prefix_cache.entries == 1

        def no_memory(cache, length):
            raise RuntimeError(MPS_OOM)

        monkeypatch.setattr(torch_lm, "copy_cache", no_memory)
        with pytest.raises(OutOfMemory, match="PyTorch MPS ran out of memory"):
            run(scheduler, params(prompt + " more", 6))
        assert wait_idle(scheduler).prefix_cache.entries == 0 and scheduler.prefix_cache.bytes == 0
        monkeypatch.undo()
        _, done = run(scheduler, params(prompt + " more", 6))
        assert done.completion_tokens == 6 and done.cached_tokens == 0


def test_configuring_the_cache_after_the_warm_up_starts_its_counters_afresh(demo):
    """The worker warms up with the cache at 0 and configures it after: status must not count the warm-up's prompt."""
    with running(demo) as scheduler:
        run(wait_idle(scheduler), params("Hello", max_tokens=4))
        scheduler.configure_prefix_cache(1 << 20)
        _, done = run(scheduler, params("Hello world, and more", max_tokens=2))
        figures = wait_idle(scheduler).prefix_cache
        assert figures.configured_bytes == figures.budget_bytes == 1 << 20
        assert (figures.hit_tokens, figures.miss_tokens, figures.entries) == (0, done.prompt_tokens, 1)
