"""Timing a stream of tokens the same way for every system, so their figures compare."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable


@dataclasses.dataclass
class StreamTiming:
    ttft_s: float
    gaps_s: list[float]      # between consecutive tokens
    tokens: int
    total_s: float


def time_tokens(tokens: Iterable[object], started: float | None = None) -> StreamTiming:
    """Consumes an iterable that yields once per token; the clock starts at `started` (perf_counter seconds:
    when the request was sent), or else before the first pull."""
    started = time.perf_counter() if started is None else started
    last, ttft, gaps, count = started, 0.0, [], 0
    for _ in tokens:
        now = time.perf_counter()
        if count == 0:
            ttft = now - started
        else:
            gaps.append(now - last)
        last, count = now, count + 1
    return StreamTiming(ttft, gaps, count, time.perf_counter() - started)


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    """p50 and p99 by nearest rank, in the milliseconds the report shows; zeros when nothing was measured."""
    if not samples_s:
        return {"p50": 0.0, "p99": 0.0}
    ordered = sorted(samples_s)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": round(pick(0.50) * 1000, 3), "p99": round(pick(0.99) * 1000, 3)}
