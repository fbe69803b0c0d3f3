"""Where a request's events go once the decode loop has them: one interface, two places.

The decode loop puts each request's events (TokenEvents, then a Finished or
the exception it failed with) into that request's sink, and flushes the sinks
a step touched once the step is done. The daemon's stream (step_outbox.py)
sends everything flushed together, one message per step; QueueSink keeps the
events for a thread that reads them one by one, as the warm-up, the
benchmarks' in-process runs and the tests do.
"""

from __future__ import annotations

import queue
from typing import Iterator, Protocol

from mpsd.worker.backends.base import Finished, TokenEvent, ToolCallEvent

Event = TokenEvent | ToolCallEvent | Finished | BaseException


class EventSink(Protocol):
    def put(self, event: Event) -> None:
        """Called by the thread that made the event; not yet visible to the reader until flush()."""

    def flush(self) -> None:
        """What was put is ready: the reader may take it now."""

    def closed_early(self) -> None:
        """The request left without a Finished (cancelled): a reader waiting for more must stop."""


class _Closed:
    """Ends a QueueSink's events without a Finished: the request was cancelled."""


class QueueSink:
    """The events of one request, read by one thread as they come (iterating it)."""

    def __init__(self) -> None:
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, event: Event) -> None:
        self._events.put(event)

    def flush(self) -> None:
        pass  # each event is visible once put

    def closed_early(self) -> None:
        self._events.put(_Closed())

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        """TokenEvents then one Finished; raises the request's failure; ends early if cancelled."""
        while True:
            event = self._events.get()
            if isinstance(event, _Closed):
                return
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Finished):
                return


def relay(events, sink: EventSink) -> None:
    """Pushes a pulled stream of events (an engine's HTTP stream) into a sink, each as soon as it comes."""
    try:
        for event in events:
            sink.put(event)
            sink.flush()
    except Exception as exc:  # noqa: BLE001  (the request's failure is its last event)
        sink.put(exc)
        sink.flush()
