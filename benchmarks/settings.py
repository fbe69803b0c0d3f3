"""How much to measure: --quick for a smoke run, the full run for the README figures."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Settings:
    max_tokens: int          # tokens per stream for throughput runs
    ttft_requests: int       # requests for TTFT percentiles
    transport_tokens: int    # tokens per stream through the null-lm worker
    max_workers: int         # scaling goes 1 .. this
    repeats: int             # streams per measurement
    prompt: str = "The module provides"

    @classmethod
    def quick(cls) -> "Settings":
        return cls(max_tokens=64, ttft_requests=8, transport_tokens=2000, max_workers=min(2, _cores()), repeats=1)

    @classmethod
    def full(cls) -> "Settings":
        return cls(max_tokens=256, ttft_requests=40, transport_tokens=20000, max_workers=_cores(), repeats=3)

    @classmethod
    def tiny(cls) -> "Settings":
        """For the test suite's smoke test: every figure, almost no time."""
        return cls(max_tokens=8, ttft_requests=2, transport_tokens=200, max_workers=1, repeats=1)


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def cores() -> int:
    return _cores()
