"""How much to measure (--quick for a smoke run, the full run for the figures in docs/performance.md), and on how many threads."""

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
        return cls(max_tokens=64, ttft_requests=8, transport_tokens=2000, max_workers=min(2, cores()), repeats=1)

    @classmethod
    def full(cls) -> "Settings":
        return cls(max_tokens=256, ttft_requests=40, transport_tokens=20000, max_workers=cores(), repeats=3)

    @classmethod
    def tiny(cls) -> "Settings":
        """For the test suite's smoke test: every figure, almost no time."""
        return cls(max_tokens=8, ttft_requests=2, transport_tokens=200, max_workers=1, repeats=1)


def cores() -> int:
    """The cores this process may run on, which a container or taskset may keep below the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def worker_threads(workers: int, n_cores: int) -> int:
    """The thread count mpsd gives each worker by default, used for every system alike."""
    from mpsd.config import ModelConfig
    from mpsd.supervisor.daemon import default_threads

    model = ModelConfig(name="bench", backend="torch-lm", path="-", replicas=workers)
    return default_threads(model, (model,), n_cores)
