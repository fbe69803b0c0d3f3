"""Which worker serves a request: per-model pools of slots and a bounded queue.

The pool owns in-flight counts; the fleet tells it when a worker becomes
READY or leaves READY. A freed slot goes straight to the oldest waiter, so
queued requests are served in order and no wake-up stampede happens.

With routing "prefix", a request that brings its text (a routing key) goes to
the worker the pool's PrefixTree says most likely holds the longest prefix of
it, as prefix_policy.follow_prefix decides, else least loaded; the chosen
worker is recorded as holding the text, and `record` adds the answer once the
stream is done. A worker leaving READY is forgotten.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import time
from typing import Any, Callable, NamedTuple

from mpsd.config.schema import RoutingThresholds
from mpsd.supervisor.routing.prefix_policy import follow_prefix
from mpsd.supervisor.routing.prefix_tree import PrefixTree

# A client's own timer fires at its deadline, so an answer sent then is lost to it (it sees a bare DEADLINE_EXCEEDED).
# A wait that memory blocks (why_waiting) ends this much earlier, so the client learns what holds the memory.
MEMORY_ANSWER_MARGIN_S = 0.25
SGLANG_THRESHOLDS = RoutingThresholds()  # the config's defaults


class QueueFull(Exception):
    """The model's queue is at its bound: answered as RESOURCE_EXHAUSTED."""


class NoWorkers(Exception):
    """No worker of this model is live or coming: answered as UNAVAILABLE."""


@dataclasses.dataclass(eq=False)
class Slot:
    """One READY worker process; a restarted worker gets a new Slot."""

    worker_id: str
    link: Any  # fleet/worker_link.WorkerLink: what requests reach the worker by
    inflight: int = 0
    last_assigned: int = 0
    idle_since: float = dataclasses.field(default_factory=time.monotonic)  # when its last request ended


def choose_worker(slots: list[Slot], concurrency: int, exclude: frozenset[Slot] = frozenset()) -> Slot | None:
    """Least outstanding first; among equals, the one assigned longest ago."""
    free = [s for s in slots if s.inflight < concurrency and s not in exclude]
    return min(free, key=lambda s: (s.inflight, s.last_assigned), default=None)


@dataclasses.dataclass(frozen=True)
class Lease:
    slot: Slot
    routing_key: str | None = None  # the text the request was routed by; None: routed by load alone

    @property
    def worker_id(self) -> str:
        return self.slot.worker_id

    @property
    def link(self) -> Any:
        return self.slot.link


class _Request(NamedTuple):
    """What routing knows of a request: the slots it may not use, its text and that text's block hashes."""

    exclude: frozenset[Slot]
    key: str | None
    hashes: list[int]


class _Waiter(NamedTuple):
    future: asyncio.Future
    request: _Request


class ModelPool:
    def __init__(self, name: str, concurrency: int, queue_limit: int, prospects: Callable[[], str | None],
                 why_waiting: Callable[[], str] = lambda: "", routing: str = "prefix",
                 thresholds: RoutingThresholds = SGLANG_THRESHOLDS) -> None:
        """prospects: None while a worker may still come (live, loading, or demand may start one), else why not.
        why_waiting: why queued requests cannot be served now (a load refused for memory), "" when nothing stops it.
        routing: "prefix" (keyed requests follow their prefix, as thresholds say) or "least-loaded"."""
        self.name = name
        self._concurrency = concurrency
        self._queue_limit = queue_limit
        self._prospects = prospects
        self.why_waiting = why_waiting
        self._thresholds = thresholds
        self._tree: PrefixTree | None = PrefixTree() if routing == "prefix" else None
        self._slots: dict[str, Slot] = {}
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._sequence = itertools.count(1)
        self.context_length = 0
        # Leases held, counted here because a worker that leaves READY (draining) takes its slot but not its requests.
        self.inflight_total = 0

    def reconfigure(self, concurrency: int, queue_limit: int, routing: str | None = None) -> None:
        """routing: None keeps the current one."""
        self._concurrency, self._queue_limit = concurrency, queue_limit
        if routing is not None and (routing == "prefix") != self.follows_prefix:
            self._tree = PrefixTree() if routing == "prefix" else None
        self._hand_out()

    @property
    def follows_prefix(self) -> bool:
        """Whether a routing key changes anything: acquire uses it and record keeps it."""
        return self._tree is not None

    def record(self, lease: Lease, text: str) -> None:
        """The lease's worker now also holds `text` (its request's key with the answer): the next turn follows it.
        Nothing is kept for a worker that left READY meanwhile."""
        if self._tree is not None and self._slots.get(lease.worker_id) is lease.slot:
            self._tree.insert(lease.worker_id, text)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def ready_count(self) -> int:
        return len(self._slots)

    def inflight(self, worker_id: str) -> int:
        slot = self._slots.get(worker_id)
        return slot.inflight if slot else 0

    def idle_since(self, worker_id: str) -> float | None:
        """When the worker last went idle (monotonic); None while it is busy or not READY."""
        slot = self._slots.get(worker_id)
        return slot.idle_since if slot and not slot.inflight else None

    def add_worker(self, worker_id: str, link: Any, context_length: int) -> None:
        self._slots[worker_id] = Slot(worker_id, link)
        self._forget(worker_id)  # a new process: its cache is empty
        self.context_length = context_length or self.context_length
        self._hand_out()

    def remove_worker(self, worker_id: str) -> None:
        self._slots.pop(worker_id, None)
        self._forget(worker_id)
        self.check_prospects()

    def _forget(self, worker_id: str) -> None:
        if self._tree is not None:
            self._tree.forget(worker_id)

    def check_prospects(self) -> None:
        """Fails queued requests once no worker is live and none is coming, saying why."""
        if not self._slots and (why := self._prospects()) is not None:
            self.fail_waiters(NoWorkers(f"model {self.name!r} has no live worker: {why}"))

    def fail_waiters(self, error: Exception) -> None:
        while self._waiters:
            future, _ = self._waiters.popleft()
            if not future.done():
                future.set_exception(error)

    async def acquire(self, timeout_s: float | None, exclude: frozenset[Slot] = frozenset(),
                      routing_key: str | None = None) -> Lease:
        """A slot now, or a place in the queue until one frees; raises QueueFull, NoWorkers, TimeoutError.
        routing_key: the request's text (a prompt, a chat's canonical text), for prefix-aware routing."""
        self._hand_out()  # whoever still waits after this cannot use any free slot, so taking one starves no one
        keyed = routing_key if self._tree is not None else None
        request = _Request(exclude, keyed, self._tree.hashes(keyed) if keyed else [])
        slot = self._choose(request)
        if slot:
            return self._take(slot, request)
        if not self._slots and (why := self._prospects()) is not None:
            raise NoWorkers(f"model {self.name!r} has no live worker: {why}")
        if len(self._waiters) >= self._queue_limit:
            raise QueueFull(f"model {self.name!r}: queue is full ({self._queue_limit} waiting); retry later")
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        entry = _Waiter(future, request)
        self._waiters.append(entry)
        try:
            return await self._wait(future, timeout_s)
        except BaseException:
            self._abandon(entry)
            raise

    async def _wait(self, future: asyncio.Future, timeout_s: float | None) -> Lease:
        """Until a slot is handed over or the deadline passes; MEMORY_ANSWER_MARGIN_S sooner while memory blocks it.
        The waiter keeps its place in the queue throughout."""
        if timeout_s is None or timeout_s <= MEMORY_ANSWER_MARGIN_S:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout_s - MEMORY_ANSWER_MARGIN_S)
        except asyncio.TimeoutError:
            if self.why_waiting():
                raise
        return await asyncio.wait_for(asyncio.shield(future), MEMORY_ANSWER_MARGIN_S)

    def release(self, lease: Lease) -> None:
        if lease.slot.inflight > 0:
            lease.slot.inflight -= 1
            self.inflight_total -= 1
            if not lease.slot.inflight:
                lease.slot.idle_since = time.monotonic()
        self._hand_out()

    def _choose(self, request: _Request) -> Slot | None:
        slots = list(self._slots.values())
        if request.hashes and self._tree is not None:
            allowed = [s for s in slots if s not in request.exclude]
            matched = self._tree.matches(request.hashes)
            chosen = follow_prefix(allowed, self._concurrency, matched, len(request.key), self._thresholds)
            if chosen is not None:
                return chosen
        return choose_worker(slots, self._concurrency, request.exclude)

    def _take(self, slot: Slot, request: _Request) -> Lease:
        slot.inflight += 1
        self.inflight_total += 1
        slot.last_assigned = next(self._sequence)
        if request.hashes and self._tree is not None:
            self._tree.insert_hashes(slot.worker_id, request.hashes)  # it will hold the prompt once it prefills
        return Lease(slot, request.key)

    def _hand_out(self) -> None:
        """Serves waiters in order; one that excludes every free slot (a retry) is skipped, not waited behind."""
        for entry in list(self._waiters):
            future, request = entry
            if future.done():
                self._waiters.remove(entry)
                continue
            slot = self._choose(request)
            if slot is None:
                if not request.exclude:
                    return  # no free slot at all: nobody behind can be served either
                continue
            self._waiters.remove(entry)
            future.set_result(self._take(slot, request))

    def _abandon(self, entry: _Waiter) -> None:
        """A waiter gave up (deadline, cancel): leave the queue, or return a slot it was just handed."""
        future, _ = entry
        try:
            self._waiters.remove(entry)
        except ValueError:
            pass
        if future.done() and not future.cancelled() and future.exception() is None:
            self.release(future.result())
        elif not future.done():
            future.cancel()
