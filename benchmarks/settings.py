"""How much to measure (--quick for a smoke run, the full run for the figures in docs/performance.md), and on how many threads."""

from __future__ import annotations

import dataclasses
import os

CONCURRENCY = 16   # sequences one worker (or peer replica) decodes together: mpsd's default for language models


@dataclasses.dataclass(frozen=True)
class Settings:
    max_tokens: int                  # tokens per stream in every throughput cell
    ttft_requests: int               # sequential 1-token requests for the TTFT percentiles of direct and mpsd
    transport_tokens: int            # tokens per cell through the null-lm worker, split among its streams
    single_rounds: int               # streams run one after another in a 1-stream cell (its TTFT samples)
    stream_levels: tuple[int, ...]   # concurrent streams per sweep cell
    worker_counts: tuple[int, ...]   # workers (peer replicas) per sweep row
    mlx_tokens: int                  # tokens per stream in the MLX comparison (MLX on a CPU is slow)
    mlx_levels: tuple[int, ...]      # concurrent streams in the MLX comparison; () skips it
    cell_repeats: int = 1            # runs of each cell; the best by tok/s is reported, all runs' tok/s beside it
    transport_levels: tuple[int, ...] = (1, 8, 16)
    concurrency: int = CONCURRENCY
    prompt: str = "The module provides"

    @classmethod
    def quick(cls) -> "Settings":
        return cls(max_tokens=32, ttft_requests=8, transport_tokens=3000, single_rounds=2, stream_levels=(1, 4, 16, 64),
                   worker_counts=(1, min(2, cores())), mlx_tokens=16, mlx_levels=(1, 16))

    @classmethod
    def full(cls) -> "Settings":
        return cls(max_tokens=128, ttft_requests=40, transport_tokens=24000, single_rounds=4,
                   stream_levels=(1, 4, 16, 64), worker_counts=(1, 2), mlx_tokens=64, mlx_levels=(1, 16), cell_repeats=2)

    @classmethod
    def tiny(cls) -> "Settings":
        """For the test suite's smoke test: every figure, almost no time."""
        return cls(max_tokens=4, ttft_requests=2, transport_tokens=160, single_rounds=1, stream_levels=(1, 4),
                   worker_counts=(1,), mlx_tokens=4, mlx_levels=())


def cores() -> int:
    """The cores this process may run on, which a container or taskset may keep below the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def worker_threads(workers: int, n_cores: int) -> int:
    """The thread count mpsd gives each worker by default, used for every system alike."""
    from mpsd.config import ModelConfig
    from mpsd.supervisor.fleet.worker_env import default_threads

    model = ModelConfig(name="bench", backend="torch-lm", path="-", replicas=workers)
    return default_threads(model, (model,), n_cores)
