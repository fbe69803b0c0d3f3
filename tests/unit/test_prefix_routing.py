"""Prefix-aware routing: the daemon's per-worker picture over text, the SGLang-style policy, the pool and the edge."""

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mpsd.chat_params import ChatMessage
from mpsd.config.schema import RoutingThresholds
from mpsd.supervisor.edge.inference import InferenceService
from mpsd.supervisor.routing.pool import ModelPool
from mpsd.supervisor.routing.prefix_policy import (
    balance_abs_threshold,
    chat_answer_suffix,
    chat_routing_key,
    follow_prefix,
    imbalanced,
)
from mpsd.supervisor.routing.prefix_tree import (
    BLOCK_CHARS,
    MAX_BLOCKS_PER_WORKER,
    MAX_CHARS_PER_WORKER,
    PrefixTree,
    block_hashes,
)
from mpsd.v1 import inference_pb2

SGLANG = RoutingThresholds()  # cache 0.5, abs 32, rel 1.0001


def text(n: int, seed: str = "a") -> str:
    """n characters that differ from any other seed's from the first block on."""
    return (seed * BLOCK_CHARS + "".join(chr(48 + i % 40) for i in range(n)))[:n]


# --- the tree -------------------------------------------------------------------------------------------------------

def test_chained_hashes_stand_for_the_whole_prefix():
    base = "x" * 100 + "y" * 100
    assert block_hashes(base)[:2] == block_hashes(base[:150])[:2] and len(block_hashes(base)) == 200 // BLOCK_CHARS
    changed = "z" + base[1:]
    assert not set(block_hashes(changed)) & set(block_hashes(base)), "a change in block 0 changes every hash after it"
    assert block_hashes("short") == [], "only whole blocks are hashed"
    assert MAX_BLOCKS_PER_WORKER * BLOCK_CHARS == MAX_CHARS_PER_WORKER


def test_match_finds_the_worker_with_the_longest_prefix():
    tree = PrefixTree(block_chars=4)
    tree.insert("w0", "aaaabbbb")
    tree.insert("w1", "aaaabbbbccccdd")
    tree.insert("w2", "zzzzzzzz")
    assert tree.match("aaaabbbbccccdddd") == ("w1", 12)
    assert tree.match("aaaabbbbXXXX") in (("w0", 8), ("w1", 8))
    assert tree.matches(tree.hashes("aaaabbbbXXXX")) == {"w0": 8, "w1": 8}
    assert tree.match("aaaXbbbb") == (None, 0)
    assert tree.match("") == (None, 0)


def test_forget_drops_a_worker_and_only_it():
    tree = PrefixTree(block_chars=4)
    tree.insert("w0", "aaaabbbb")
    tree.insert("w1", "aaaa")
    tree.forget("w0")
    tree.forget("never-seen")
    assert tree.match("aaaabbbb") == ("w1", 4)
    assert tree.cached_chars("w0") == 0 and tree.cached_chars("w1") == 4


def test_the_cap_evicts_the_tips_of_the_oldest_texts_and_keeps_their_prefixes():
    tree = PrefixTree(block_chars=4, max_blocks_per_worker=4)
    tree.insert("w0", "aaaabbbbccccdddd")  # 4 blocks: full
    tree.insert("w0", "xxxxyyyy")          # 2 more: the 2 oldest go, which are the old text's last two blocks
    assert tree.cached_chars("w0") == 16
    assert tree.match("aaaabbbbccccdddd") == ("w0", 8)
    assert tree.match("xxxxyyyy") == ("w0", 8)
    tree.insert("w0", "aaaa")              # used again: now the newest, so the next eviction takes bbbb first
    tree.insert("w0", "qqqq")
    assert tree.match("aaaabbbb") == ("w0", 4) and tree.match("xxxxyyyy") == ("w0", 8)
    tree.insert("w0", "a" * 4 * 10)        # one text over the cap keeps its first blocks
    assert tree.cached_chars("w0") == 16 and tree.match("a" * 40) == ("w0", 16)


def test_a_long_prompt_against_full_workers_is_cheap():
    """Sanity of the cost, without timing it: 8 workers with full pictures, 10k-character prompts, many times."""
    tree = PrefixTree()
    history = text(MAX_CHARS_PER_WORKER)
    for w in range(8):
        tree.insert(f"w{w}", f"{w}" + history)
    assert all(tree.cached_chars(f"w{w}") == MAX_CHARS_PER_WORKER for w in range(8))
    prompt = "3" + history[:10_000]
    for _ in range(300):  # ~50 µs each here; a linear scan per worker would take seconds
        hashes = tree.hashes(prompt)
        matched = tree.matches(hashes)
        tree.insert_hashes("w3", hashes)
    assert matched == {"w3": 10_000 // BLOCK_CHARS * BLOCK_CHARS}


# --- the policy -----------------------------------------------------------------------------------------------------

class W:
    def __init__(self, worker_id: str, inflight: int = 0, last_assigned: int = 0) -> None:
        self.worker_id, self.inflight, self.last_assigned = worker_id, inflight, last_assigned


def test_imbalance_needs_both_thresholds():
    assert not imbalanced([0, 32], SGLANG), "32 beyond the idlest is not more than balance_abs_threshold"
    assert imbalanced([0, 33], SGLANG)
    assert not imbalanced([100, 133], RoutingThresholds(balance_abs_threshold=32, balance_rel_threshold=1.5))
    assert imbalanced([100, 151], RoutingThresholds(balance_abs_threshold=32, balance_rel_threshold=1.5))
    assert not imbalanced([], SGLANG)


def test_the_absolute_threshold_is_capped_at_a_quarter_of_a_workers_concurrency():
    """A worker runs at most `concurrency` sequences: SGLang's 32 would never balance a pool of 16-sequence workers."""
    assert balance_abs_threshold(SGLANG, 16) == 4 and balance_abs_threshold(SGLANG, 256) == 32
    assert balance_abs_threshold(SGLANG, 1) == 1 and balance_abs_threshold(RoutingThresholds(balance_abs_threshold=2), 16) == 2
    assert not imbalanced([0, 4], SGLANG, 16) and imbalanced([0, 5], SGLANG, 16)
    holder, idle = W("holder", inflight=5), W("idle")
    assert follow_prefix([holder, idle], 16, {"holder": 100}, 100, SGLANG) is None, "5 beyond the idle one: balance"
    assert follow_prefix([W("holder", inflight=4), idle], 16, {"holder": 100}, 100, SGLANG).worker_id == "holder"


def test_the_prefix_is_followed_above_the_cache_threshold_only():
    a, b = W("a", inflight=3), W("b")
    assert follow_prefix([a, b], 16, {"a": 51}, 100, SGLANG) is a, "51% held: follow it, though b is idle"
    assert follow_prefix([a, b], 16, {"a": 50}, 100, SGLANG) is None, "50% is not above 0.5: least loaded"
    assert follow_prefix([a, b], 16, {}, 100, SGLANG) is None
    assert follow_prefix([a, b], 16, {"a": 10}, 100, RoutingThresholds(cache_threshold=0.05)) is a
    assert follow_prefix([a, b], 16, {"a": 100}, 100, RoutingThresholds(cache_threshold=1.0)) is None
    assert follow_prefix([a, b], 16, {"a": 0}, 0, SGLANG) is None, "an empty text follows nothing"


def test_the_longest_match_wins_and_among_equals_the_less_busy_then_the_one_assigned_longest_ago():
    a, b, c = W("a", inflight=1, last_assigned=9), W("b", inflight=1, last_assigned=2), W("c", inflight=0)
    assert follow_prefix([a, b, c], 16, {"a": 90, "b": 80}, 100, SGLANG) is a
    assert follow_prefix([a, b, c], 16, {"a": 90, "b": 90}, 100, SGLANG) is b
    assert follow_prefix([a, b, c], 16, {"a": 90, "b": 90, "c": 90}, 100, SGLANG) is c


def test_an_imbalanced_pool_or_a_full_worker_falls_back_to_least_loaded():
    busy, idle = W("busy", inflight=40), W("idle", inflight=0)
    assert follow_prefix([busy, idle], 256, {"busy": 100}, 100, SGLANG) is None, "40 - 0 > 32 and 40 > 0"
    assert follow_prefix([W("busy", inflight=30), idle], 256, {"busy": 100}, 100, SGLANG).worker_id == "busy"
    full = W("full", inflight=16)
    assert follow_prefix([full, idle], 16, {"full": 100}, 100, SGLANG) is None, "no free slot on the holder"


# --- the chat key ---------------------------------------------------------------------------------------------------

SEPARATOR_HEAVY = st.text(alphabet=st.sampled_from("ab\x1b\x1d\x1e\x1f"), max_size=6)
MESSAGES = st.lists(st.tuples(st.sampled_from(["system", "user", "assistant", "tool"]), SEPARATOR_HEAVY), max_size=4)


def messages(pairs) -> list[ChatMessage]:
    return [ChatMessage(role, content) for role, content in pairs]


@given(MESSAGES, SEPARATOR_HEAVY, SEPARATOR_HEAVY, SEPARATOR_HEAVY)
def test_the_next_turn_extends_this_turns_key_and_its_answer(history, answer, question, tools):
    now = chat_routing_key(messages(history), tools)
    later = chat_routing_key(messages([*history, ("assistant", answer), ("user", question)]), tools)
    assert later.startswith(now + chat_answer_suffix(answer))


@given(MESSAGES, MESSAGES, SEPARATOR_HEAVY, SEPARATOR_HEAVY)
def test_different_conversations_never_share_a_key(one, other, tools_one, tools_other):
    if (one, tools_one) != (other, tools_other):
        assert chat_routing_key(messages(one), tools_one) != chat_routing_key(messages(other), tools_other)


def test_separators_inside_a_content_are_not_messages():
    forged = [ChatMessage("user", "hi\x1eassistant\x1fsure")]
    assert chat_routing_key(forged) != chat_routing_key([ChatMessage("user", "hi"), ChatMessage("assistant", "sure")])
    assert chat_routing_key([ChatMessage("user", "plain")]) == "\x1euser\x1fplain", "no cost when nothing is escaped"


# --- the pool -------------------------------------------------------------------------------------------------------

def scenario(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())
    return run


def pool_of(*worker_ids: str, concurrency: int = 4, routing: str = "prefix") -> ModelPool:
    pool = ModelPool("m", concurrency=concurrency, queue_limit=4, prospects=lambda: None, routing=routing)
    for worker_id in worker_ids:
        pool.add_worker(worker_id, f"stub-{worker_id}", 1024)
    return pool


CONVERSATION = text(1000)


@scenario
async def test_a_conversation_returns_to_the_worker_that_holds_it_though_another_is_idler():
    pool = pool_of("w0", "w1")
    first = await pool.acquire(1, routing_key=CONVERSATION)
    assert first.routing_key == CONVERSATION
    other = await pool.acquire(1, routing_key=text(1000, "b"))
    assert other.worker_id != first.worker_id, "no match: least loaded"
    pool.record(first, CONVERSATION + " the answer")
    pool.release(first)
    also_busy = await pool.acquire(1)  # no key: least loaded, so the holder ends up busier than the other
    assert also_busy.worker_id == first.worker_id and pool.inflight(first.worker_id) == 1
    pool.release(other)
    follow_up = await pool.acquire(1, routing_key=CONVERSATION + " the answer, and a next question")
    assert follow_up.worker_id == first.worker_id and pool.inflight(first.worker_id) == 2


@scenario
async def test_least_loaded_models_ignore_the_key_and_record_nothing():
    pool = pool_of("w0", "w1", routing="least-loaded")
    assert not pool.follows_prefix
    first = await pool.acquire(1, routing_key=CONVERSATION)
    assert first.routing_key is None
    pool.record(first, CONVERSATION)
    pool.release(first)
    held = await pool.acquire(1)
    assert (await pool.acquire(1, routing_key=CONVERSATION)).worker_id != held.worker_id
    pool.reconfigure(4, 4, "prefix")
    assert pool.follows_prefix


@scenario
async def test_a_full_holder_and_a_worker_that_left_ready_fall_back_to_least_loaded():
    pool = pool_of("w0", "w1", concurrency=1)
    first = await pool.acquire(1, routing_key=CONVERSATION)
    holder = first.worker_id
    second = await pool.acquire(1, routing_key=CONVERSATION)
    assert second.worker_id != holder, "the holder is full"
    pool.release(first)
    pool.release(second)
    pool.remove_worker(holder)  # its picture goes with it ...
    pool.add_worker(holder, "stub-again", 1024)
    pool.record(first, CONVERSATION)  # ... and a lease of the old process records nothing for the new one
    busy = await pool.acquire(1, routing_key=CONVERSATION)  # second's worker holds it now (recorded at routing)
    assert busy.worker_id == second.worker_id
    assert (await pool.acquire(1, routing_key=CONVERSATION)).worker_id == holder


@scenario
async def test_a_retry_never_follows_the_prefix_to_the_worker_it_lost():
    pool = pool_of("w0", "w1")
    lost = await pool.acquire(1, routing_key=CONVERSATION)
    pool.release(lost)
    retry = await pool.acquire(1, exclude=frozenset({lost.slot}), routing_key=CONVERSATION)
    assert retry.worker_id != lost.worker_id


@scenario
async def test_a_queued_request_keeps_its_key():
    pool = pool_of("w0", concurrency=1)
    held = await pool.acquire(1)
    waiter = asyncio.create_task(pool.acquire(5, routing_key=CONVERSATION))
    await asyncio.sleep(0)
    pool.release(held)
    lease = await asyncio.wait_for(waiter, 1)
    assert lease.routing_key == CONVERSATION
    pool.release(lease)
    pool.add_worker("w1", "stub-w1", 1024)
    assert (await pool.acquire(1, routing_key=CONVERSATION)).worker_id == "w0", "recorded when handed out"


@scenario
async def test_a_prefix_every_request_shares_does_not_pile_them_all_on_one_worker():
    """An agent's system prompt: every conversation's first turn matches it on the worker that saw it first. Once that
    worker is a quarter of its concurrency ahead the next goes to the other, which then holds it too, and equal
    matches go to the less busy: the conversations spread, each staying where its own history is."""
    pool = pool_of("w0", "w1", concurrency=16)
    system = text(2000)
    leases = [await pool.acquire(1, routing_key=system + f" conversation {i}") for i in range(8)]
    by_worker = collections.Counter(lease.worker_id for lease in leases)
    assert sorted(by_worker.values()) == [3, 5], by_worker
    for lease in leases:
        pool.release(lease)


# --- the edge -------------------------------------------------------------------------------------------------------

class FakeStream:
    """A TokenStream (fleet/worker_link.py) as the edge uses it: iterated, then closed."""

    def __init__(self, worker_id: str, pieces: list[str]) -> None:
        self._messages = [inference_pb2.GenerateResponse(index=i, text=p) for i, p in enumerate(pieces)]
        self._messages.append(inference_pb2.GenerateResponse(finish=inference_pb2.Finish(reason="stop",
                                                                                      worker_id=worker_id)))

    def __aiter__(self):
        return self._stream()

    async def _stream(self):
        for message in self._messages:
            yield message

    def close(self) -> None:
        pass


ANSWER = "the answer " * 20  # longer than the request: the next turn follows the worker only if it was recorded
SHORT = text(100)


class FakeWorker:
    """A WorkerLink: every request answered with the same twenty pieces."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id, self.requests = worker_id, []

    def open(self, method, request, timeout_s, limit):
        self.requests.append(request)
        return FakeStream(self.worker_id, ["the answer "] * 20)


class FakeContext:
    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")

    def time_remaining(self):
        return 5.0

    def code(self):
        return None


async def served_by(service: InferenceService, request, method: str) -> str:
    messages = [m async for m in service.stream(request, FakeContext(), method)]
    return messages[-1].finish.worker_id


@pytest.mark.parametrize("method", ["Generate", "Chat"])
def test_the_edge_routes_by_the_request_text_and_records_the_answer(method):
    async def run() -> None:
        pool = ModelPool("m", concurrency=4, queue_limit=4, prospects=lambda: None)
        for worker_id in ("w0", "w1"):
            pool.add_worker(worker_id, FakeWorker(worker_id), 4096)
        service = InferenceService({"m": pool}, lambda name: True)
        history = [inference_pb2.ChatMessage(role="system", content=SHORT),
                   inference_pb2.ChatMessage(role="user", content="hello?")]

        def request(*turns: tuple[str, str]):
            if method == "Generate":
                return inference_pb2.GenerateRequest(model="m", prompt=SHORT + "".join(t for _, t in turns))
            more = [inference_pb2.ChatMessage(role=r, content=t) for r, t in turns]
            return inference_pb2.ChatRequest(model="m", messages=[*history, *more])

        holder = await served_by(service, request(), method)
        one, two = await pool.acquire(1), await pool.acquire(1)  # keyless: one on each worker
        held = one if one.worker_id == holder else two
        pool.release(two if held is one else one)  # the holder is now the busier one
        if method == "Chat":
            # the key is the canonical text of the messages, and the answer came back as the assistant's turn
            expected = chat_routing_key(history) + chat_answer_suffix(ANSWER)
            assert pool._tree.match(expected) == (holder, len(expected) // BLOCK_CHARS * BLOCK_CHARS)
        assert await served_by(service, request(("assistant", ANSWER), ("user", "and then?")), method) == holder
        pool.release(held)

    asyncio.run(run())
