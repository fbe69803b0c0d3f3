"""One cell of the concurrency sweep: N streams at once against any system, measured the same way for all.

One thread sends every request, in order, 1 ms apart (STAGGER_S), and
hands each started stream to a thread of its own that reads its tokens; so
the order requests reach a server is the order sent, whatever the 64 reading
threads do on 2 cores. A stream is "overtaken" when one sent after it got its
first token more than half a generation (half the median time from a
stream's first token to its last) before it did: requests queued behind a
full batch start a whole generation apart, so a queue that jumped shows that
lead, while the readers' scheduling jitter stays well below it. A stream
that raises is a failure, counted and kept as one line; the others go on.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import statistics
import time
from typing import Callable, Iterator

from benchmarks import interference
from benchmarks.timing import StreamTiming, percentiles_ms, time_tokens

STAGGER_S = 0.001
MIN_ORDER_TOLERANCE_S = 0.005   # for very short generations
MAX_FAILURE_EXAMPLES = 3

# Sends one request now and returns an iterator that yields once per token as they arrive. An iterator with a
# `reported_tokens` attribute (set once it ends) counts tokens that way instead (mlx_lm.server's usage).
Start = Callable[[], Iterator[object]]


@dataclasses.dataclass
class _Outcome:
    sent_at: float            # perf_counter seconds
    timing: StreamTiming | None
    failure: str = ""


def timed(start: Start) -> StreamTiming:
    """One stream, sent now and read to its end."""
    sent_at = time.perf_counter()
    return _read(sent_at, start()).timing


def _read(sent_at: float, tokens: Iterator[object]) -> _Outcome:
    try:
        timing = time_tokens(tokens, started=sent_at)
    except Exception as exc:  # noqa: BLE001 - a failed stream is a figure of the cell
        return _Outcome(sent_at, None, _describe(exc))
    reported = getattr(tokens, "reported_tokens", None)
    if reported is not None:
        timing.tokens = reported
    return _Outcome(sent_at, timing)


def run_cell(start: Start, streams: int, rounds: int = 1, stagger_s: float = STAGGER_S) -> dict:
    """streams concurrent streams; with rounds > 1 each reader then sends its next one when the last ends."""
    before = interference.snapshot()
    started = time.perf_counter()

    def reader(sent_at: float, tokens: Iterator[object] | None, failure: str) -> list[_Outcome]:
        outcomes = [_read(sent_at, tokens) if tokens is not None else _Outcome(sent_at, None, failure)]
        for _ in range(rounds - 1):
            sent_at = time.perf_counter()
            outcomes.append(_send_and_read(start, sent_at))
        return outcomes

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        futures = []
        for index in range(streams):
            delay = started + index * stagger_s - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent_at = time.perf_counter()
            try:
                tokens, failure = start(), ""
            except Exception as exc:  # noqa: BLE001
                tokens, failure = None, _describe(exc)
            futures.append(pool.submit(reader, sent_at, tokens, failure))
        outcomes = [o for future in futures for o in future.result()]
    cell = summarize(outcomes, streams, time.perf_counter() - started)
    cell["others_cores"] = interference.others_cores(before, interference.snapshot())
    return cell


def _send_and_read(start: Start, sent_at: float) -> _Outcome:
    try:
        tokens = start()
    except Exception as exc:  # noqa: BLE001
        return _Outcome(sent_at, None, _describe(exc))
    return _read(sent_at, tokens)


def summarize(outcomes: list[_Outcome], streams: int, elapsed_s: float) -> dict:
    done = [o for o in outcomes if o.timing is not None]
    failures = [o.failure for o in outcomes if o.timing is None]
    tokens = sum(o.timing.tokens for o in done)
    gaps = [g for o in done for g in o.timing.gaps_s]
    counts = [o.timing.tokens for o in done] or [0]
    return {
        "streams": streams,
        "requests": len(outcomes),
        "tokens": tokens,
        "seconds": round(elapsed_s, 3),
        "tps": round(tokens / elapsed_s, 1) if elapsed_s > 0 else 0.0,
        "ttft_ms": percentiles_ms([o.timing.ttft_s for o in done]),
        "itl_ms": percentiles_ms(gaps),
        "tokens_per_stream": [min(counts), max(counts)],
        "failures": len(failures),
        "failure_examples": failures[:MAX_FAILURE_EXAMPLES],
        "overtaken": overtaken(done, max(MIN_ORDER_TOLERANCE_S, _half_generation_s(done))),
    }


def _half_generation_s(done: list[_Outcome]) -> float:
    spans = [o.timing.total_s - o.timing.ttft_s for o in done]
    return statistics.median(spans) / 2 if spans else 0.0


def overtaken(done: list[_Outcome], tolerance_s: float) -> int:
    """Streams whose first token came more than tolerance_s after that of a stream sent later."""
    firsts = sorted((o.sent_at, o.sent_at + o.timing.ttft_s) for o in done)
    count, earliest_later = 0, float("inf")
    for _sent, first in reversed(firsts):   # the earliest first token among streams sent after this one
        if first > earliest_later + tolerance_s:
            count += 1
        earliest_later = min(earliest_later, first)
    return count


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
