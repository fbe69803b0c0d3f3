import asyncio
import functools
from typing import Awaitable, Callable

import pytest
from mpsd.supervisor.routing.pool import MEMORY_ANSWER_MARGIN_S, ModelPool, NoWorkers, QueueFull, Slot, choose_worker


def test_least_outstanding_first_then_least_recently_assigned():
    a, b, c = Slot("a", None, inflight=1, last_assigned=5), Slot("b", None, inflight=0, last_assigned=9), Slot("c", None, inflight=0, last_assigned=2)
    assert choose_worker([a, b, c], concurrency=2) is c
    assert choose_worker([a, b, c], concurrency=2, exclude=frozenset({c})) is b
    assert choose_worker([Slot("x", None, inflight=1)], concurrency=1) is None


def scenario(test: Callable[[], Awaitable[None]]) -> Callable[[], None]:
    """Runs an async test on a fresh event loop (the pool's waiters need one; no pytest asyncio plugin here)."""
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())
    return run


def pool_of(*worker_ids: str, queue_limit: int = 4, prospects: Callable[[], str | None] = lambda: None) -> ModelPool:
    """Workers that take one request at a time, so the next request queues; stub names say whose slot was handed out."""
    pool = ModelPool("m", concurrency=1, queue_limit=queue_limit, prospects=prospects)
    for worker_id in worker_ids:
        pool.add_worker(worker_id, f"stub-{worker_id}", 1024)
    return pool


@scenario
async def test_two_requests_go_to_two_workers_then_queue_in_order():
    pool = pool_of("w0", "w1", queue_limit=2)
    first, second = await pool.acquire(1), await pool.acquire(1)
    assert {first.worker_id, second.worker_id} == {"w0", "w1"}
    third = asyncio.create_task(pool.acquire(5))
    fourth = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    assert pool.queued == 2
    with pytest.raises(QueueFull, match="queue is full"):
        await pool.acquire(1)
    pool.release(second)
    assert (await third).worker_id == second.worker_id  # oldest waiter gets the freed slot
    assert not fourth.done()
    pool.release(first)
    assert (await fourth).worker_id == first.worker_id


@scenario
async def test_waiter_times_out_and_leaves_the_queue():
    pool = pool_of()
    with pytest.raises(asyncio.TimeoutError):
        await pool.acquire(0.05)
    assert pool.queued == 0


@scenario
async def test_queued_requests_fail_when_no_worker_is_coming():
    why_not: list[str | None] = [None]
    pool = pool_of(prospects=lambda: why_not[0])
    waiter = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    why_not[0] = "m-0 gave up: boot failure"
    pool.check_prospects()
    with pytest.raises(NoWorkers, match="'m' has no live worker: m-0 gave up: boot failure"):
        await waiter
    with pytest.raises(NoWorkers, match="boot failure"):
        await pool.acquire(1)


@scenario
async def test_a_new_worker_serves_the_queue():
    pool = pool_of()
    waiter = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    pool.add_worker("w0", "stub-w0", 0)
    assert (await waiter).link == "stub-w0"


@scenario
async def test_cancelled_waiter_returns_a_slot_it_was_just_handed():
    pool = pool_of("w0")
    held = await pool.acquire(1)
    waiter = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    pool.release(held)  # hands the slot to the waiter ...
    waiter.cancel()     # ... which is cancelled before it runs
    try:
        lease = await waiter  # Python 3.11's wait_for may still return the result: the caller owns it
    except asyncio.CancelledError:
        lease = None
    if lease is not None:
        pool.release(lease)
    assert pool.inflight("w0") == 0  # either way, no slot leaks
    assert (await pool.acquire(1)).worker_id == "w0"


@scenario
async def test_a_retry_that_excludes_the_only_free_worker_does_not_block_the_queue_behind_it():
    pool = pool_of("w0")
    held = await pool.acquire(1)
    retry = asyncio.create_task(pool.acquire(5, exclude=frozenset({held.slot})))  # w0 lost its stream before
    behind = asyncio.create_task(pool.acquire(5))
    await asyncio.sleep(0)
    pool.release(held)
    assert (await asyncio.wait_for(behind, 1)).worker_id == "w0", "served past the retry that cannot use w0"
    assert not retry.done()
    pool.add_worker("w1", "stub-w1", 1024)  # e.g. the replacement of the worker that was lost
    assert (await asyncio.wait_for(retry, 1)).worker_id == "w1"


@scenario
async def test_a_new_request_takes_a_free_slot_that_the_queued_retry_cannot_use():
    pool = pool_of("w0")
    probe = await pool.acquire(1)
    w0 = probe.slot
    pool.release(probe)
    retry = asyncio.create_task(pool.acquire(5, exclude=frozenset({w0})))
    await asyncio.sleep(0)
    assert pool.queued == 1
    fresh = await asyncio.wait_for(pool.acquire(1), 1)
    assert fresh.worker_id == "w0" and not retry.done()
    retry.cancel()


@scenario
async def test_a_wait_that_memory_blocks_answers_before_the_deadline_and_an_ordinary_one_at_it():
    pool = pool_of()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await pool.acquire(0.5)
    ordinary = loop.time() - started
    pool.why_waiting = lambda: "needs 10.0GiB, 5.0GiB free; nothing evictable (a-0 busy)"
    started = loop.time()
    with pytest.raises(asyncio.TimeoutError):
        await pool.acquire(0.5)
    blocked = loop.time() - started
    assert ordinary >= 0.5 and blocked < 0.5 - MEMORY_ANSWER_MARGIN_S / 2, "the client still waits for the answer"
