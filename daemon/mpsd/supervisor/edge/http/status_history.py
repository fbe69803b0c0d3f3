"""What the status page plots and lists: the last minutes of figures, and the last state transitions.

Both are rings of fixed length, so a daemon that runs for months holds the
same few hundred kilobytes it held after fifteen minutes. Sampling is a pure
step (`HistoryRing.add`) given plain numbers and a wall-clock time, so its
bounds and its rates are unit-tested without a daemon.
"""

from __future__ import annotations

import collections
import dataclasses
import time

HISTORY_S = 15 * 60
SAMPLE_PERIOD_S = 1.0
TRANSITIONS_KEPT = 40


@dataclasses.dataclass(frozen=True)
class ModelFigures:
    """One model's figures at one moment; `tokens_total` and `first_token_buckets` are the cumulative counters
    (the first-token histogram as (upper bound, count) pairs) the rate and the median are taken from."""

    tokens_total: float
    queued: int
    inflight: int
    ready: int
    first_token_buckets: tuple[tuple[float, float], ...] = ()


class HistoryRing:
    """The last `HISTORY_S` seconds at `period_s` resolution: tokens/s, queue, in-flight, READY workers, memory."""

    def __init__(self, period_s: float = SAMPLE_PERIOD_S, span_s: float = HISTORY_S) -> None:
        self.period_s = period_s
        self._samples: collections.deque[dict] = collections.deque(maxlen=int(span_s / period_s) + 1)
        self._last_tokens: dict[str, tuple[float, float]] = {}  # model -> (wall time, cumulative tokens)
        self._last_buckets: dict[str, tuple[tuple[float, float], ...]] = {}  # model -> its first-token histogram

    def __len__(self) -> int:
        return len(self._samples)

    def add(self, wall_time: float, models: dict[str, ModelFigures], used_bytes: int, budget_bytes: int) -> None:
        previous, self._last_tokens = self._last_tokens, {}
        previous_buckets, self._last_buckets = self._last_buckets, {}
        row = {}
        for name, figures in models.items():
            self._last_tokens[name] = (wall_time, figures.tokens_total)
            then, before = previous.get(name, (wall_time, figures.tokens_total))
            elapsed = wall_time - then
            rate = max(figures.tokens_total - before, 0.0) / elapsed if elapsed > 0 else 0.0
            self._last_buckets[name] = figures.first_token_buckets
            ttft = median_since(previous_buckets.get(name, figures.first_token_buckets), figures.first_token_buckets)
            row[name] = {"tokens_per_s": round(rate, 2), "queued": figures.queued, "inflight": figures.inflight,
                         "ready": figures.ready, "ttft_p50_s": ttft}
        self._samples.append({"t": round(wall_time, 3), "models": row,
                              "memory": {"used_bytes": used_bytes, "budget_bytes": budget_bytes}})

    def as_plain(self) -> dict:
        return {"period_s": self.period_s, "span_s": (self._samples.maxlen - 1) * self.period_s,
                "samples": list(self._samples)}


def median_since(before: tuple[tuple[float, float], ...], now: tuple[tuple[float, float], ...]) -> float | None:
    """The upper bound of the bucket holding the median of the observations between two readings of a cumulative
    histogram (as Prometheus's histogram_quantile would place it, without interpolation); None when there were none."""
    counts = dict(before)
    new = [(bound, count - counts.get(bound, 0.0)) for bound, count in now]
    total = new[-1][1] if new else 0.0
    if total <= 0:
        return None
    bound = next(bound for bound, count in new if count >= total / 2)
    return bound if bound != float("inf") else None


class TransitionLines:
    """The last state transitions, one line each as the log writes them, newest last."""

    def __init__(self, kept: int = TRANSITIONS_KEPT) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=kept)

    def add(self, worker_id: str, pid: int, old: str, new: str, reason: str, wall_time: float | None = None) -> None:
        stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if wall_time is None else wall_time))
        self._lines.append(f"{stamp} worker {worker_id} pid={pid or '-'} {old} -> {new}: {reason}")

    def as_list(self) -> list[str]:
        return list(self._lines)
