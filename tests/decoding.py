"""Driving a decode loop (DecodeScheduler) in the test's own process: requests alone, together, staggered."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from mpsd.generate_params import GenerateParams
from mpsd.worker.backends.base import Finished, TokenEvent
from mpsd.worker.scheduler import DecodeScheduler

CLIENT_TIMEOUT_S = 120


def params(prompt="Hello world", max_tokens=16, temperature=0.0, top_p=1.0, seed=None, stop=()) -> GenerateParams:
    return GenerateParams(prompt, max_tokens, temperature, top_p, seed, tuple(stop))


@contextlib.contextmanager
def running(engine, max_sequences: int = 16, prefix_cache_bytes: int = 0) -> Iterator[DecodeScheduler]:
    """prefix_cache_bytes: the prefix cache's budget (0, off, unless a test is about it)."""
    scheduler = DecodeScheduler(engine, max_sequences)
    scheduler.configure_prefix_cache(prefix_cache_bytes)
    scheduler.start()
    try:
        yield scheduler
    finally:
        scheduler.stop()


def run(scheduler: DecodeScheduler, request: GenerateParams) -> tuple[list[TokenEvent], Finished]:
    events = list(scheduler.submit(request))
    assert all(isinstance(e, TokenEvent) for e in events[:-1]) and isinstance(events[-1], Finished), events[-3:]
    return events[:-1], events[-1]


def wait_idle(scheduler: DecodeScheduler, timeout_s: float = 30.0) -> DecodeScheduler:
    """Until every sequence has left: a client sees its Finished a moment before its KV moves to the prefix cache."""
    deadline = time.monotonic() + timeout_s
    while scheduler.running:
        assert time.monotonic() < deadline, "a sequence never left the batch"
        time.sleep(0.002)
    return scheduler


def token_ids(events) -> list[int]:
    return [e.token_id for e in events if isinstance(e, TokenEvent)]


class Client(threading.Thread):
    """One request on its own thread, as an RPC handler would read it; records when each event came."""

    def __init__(self, scheduler: DecodeScheduler, request: GenerateParams, deadline: float | None = None) -> None:
        super().__init__(daemon=True)
        self.submission = scheduler.submit(request, deadline)
        self.events: list = []
        self.arrivals: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.submission:
                self.events.append(event)
                self.arrivals.append(time.monotonic())
        except BaseException as exc:  # noqa: BLE001  (the test reads it)
            self.error = exc

    def finish(self) -> "Client":
        self.join(CLIENT_TIMEOUT_S)
        assert not self.is_alive(), "a stream hung"
        return self


def started(scheduler: DecodeScheduler, requests: list[GenerateParams]) -> list[Client]:
    """Clients already reading their streams, submitted in order."""
    clients = [Client(scheduler, request) for request in requests]
    for client in clients:
        client.start()
    return clients


def together(scheduler: DecodeScheduler, requests: list[GenerateParams], stagger_s: float = 0.0) -> list[Client]:
    """All requests in flight at once (joining a running batch when staggered); waits for every one."""
    clients = []
    for request in requests:
        clients.append(Client(scheduler, request))
        clients[-1].start()
        time.sleep(stagger_s)
    return [client.finish() for client in clients]
