"""Batched Predict: requests that arrive together run as one forward pass of a tensor model.

Why: a small model's forward pass costs nearly the same for one row as for
thirty-two (the time goes to Python, dispatch and memory traffic per call, not
to the rows), so stacking requests multiplies throughput; the price is up to
`max_batch_delay` spent waiting for neighbours. One thread owns the model here
(as the decode loop does for language models): gRPC's threads only hand a
request in and wait for its future.

Requests are stacked only when their inputs agree in names, dtypes and every
dimension but the first; outputs are split back by each request's rows, which
needs the batch to be every output's first dimension (otherwise the requests
run one by one). A batched forward that raises anything, a malformed input or
out of memory included, is run again one request at a time, so each request
gets its own outcome and never fails for a neighbour. A request whose client
left (its future cancelled) or whose deadline passed while it waited is
dropped, not run. Nothing here knows gRPC.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import sys
import threading
import time
from typing import Callable

import numpy as np

from mpsd.worker.scheduler import DeadlinePassed

Arrays = dict[str, np.ndarray]
BatchKey = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclasses.dataclass(eq=False)
class PendingPredict:
    inputs: Arrays
    deadline: float | None  # on the batcher's clock; None: the client set none
    arrived_at: float
    future: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)

    @property
    def rows(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


def batch_key(inputs: Arrays) -> BatchKey | None:
    """What requests must share to be stacked: names, dtypes and every dimension but the first.

    None when the request cannot be stacked with any other: no inputs, an
    input without dimensions, or inputs that disagree on their first
    dimension (so it is not a count of rows).
    """
    if not inputs or any(array.ndim == 0 for array in inputs.values()):
        return None
    if len({array.shape[0] for array in inputs.values()}) != 1:
        return None
    return tuple(sorted((name, array.dtype.str, array.shape[1:]) for name, array in inputs.items()))


def group(pending: list[PendingPredict]) -> list[list[PendingPredict]]:
    """Stackable requests together in arrival order; each request that stacks with none runs alone."""
    groups: dict[BatchKey | int, list[PendingPredict]] = {}
    for index, request in enumerate(pending):
        key = batch_key(request.inputs)
        groups.setdefault(index if key is None else key, []).append(request)
    return list(groups.values())


def stack(members: list[PendingPredict]) -> Arrays:
    return {name: np.concatenate([m.inputs[name] for m in members]) for name in members[0].inputs}


def split(outputs: Arrays, rows: list[int]) -> list[Arrays] | None:
    """Each request's share of a batched forward's outputs, by its rows; None unless every output's first
    dimension is the batch's rows (a model that reduces or reshapes across rows cannot be split back)."""
    total = sum(rows)
    if any(np.ndim(value) == 0 or np.shape(value)[0] != total for value in outputs.values()):
        return None
    offsets = list(itertools.accumulate(rows[:-1]))
    parts = {name: np.split(value, offsets) for name, value in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(rows))]


class PredictBatcher:
    """Collects Predicts for up to max_delay_s after the oldest arrived, or until max_batch_size wait, and runs
    each group of stackable ones as one forward pass on its own thread.

    on_batch_failure: told of an exception a batched forward raised before its requests run alone (the worker
    counts an out-of-memory error there once, as the worker's own, whatever the solo runs then do).
    """

    def __init__(self, predict: Callable[[Arrays], Arrays], max_batch_size: int, max_delay_s: float,
                 on_batch_failure: Callable[[BaseException], None] = lambda exc: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._predict = predict
        self._max_batch_size = max_batch_size
        self._max_delay_s = max_delay_s
        self._on_batch_failure = on_batch_failure
        self._clock = clock
        self._waiting: collections.deque[PendingPredict] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._warned_unsplittable = False
        self._thread = threading.Thread(target=self._loop, name="mpsd-predict", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Runs what is already waiting, then ends the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify()
        self._thread.join(timeout_s)

    def submit(self, inputs: Arrays, deadline: float | None = None) -> concurrent.futures.Future:
        """The future holds the outputs or the exception; cancelling it while queued drops the request."""
        request = PendingPredict(inputs, deadline, self._clock())
        with self._changed:
            if self._stopping:
                raise RuntimeError("the worker is stopping: Predict is no longer taken")
            self._waiting.append(request)
            self._changed.notify()
        return request.future

    def _loop(self) -> None:
        while (taken := self._collect()) is not None:
            live = [request for request in taken if self._still_wanted(request)]
            for members in group(live):
                self._run_group(members)

    def _collect(self) -> list[PendingPredict] | None:
        """Up to max_batch_size requests, once that many wait or the oldest has waited max_delay_s; None: stop."""
        with self._changed:
            while not self._waiting and not self._stopping:
                self._changed.wait()
            if not self._waiting:
                return None
            closes_at = self._waiting[0].arrived_at + self._max_delay_s
            while len(self._waiting) < self._max_batch_size and not self._stopping:
                left = closes_at - self._clock()
                if left <= 0:
                    break
                self._changed.wait(left)
            count = min(len(self._waiting), self._max_batch_size)
            return [self._waiting.popleft() for _ in range(count)]

    def _still_wanted(self, request: PendingPredict) -> bool:
        if not request.future.set_running_or_notify_cancel():
            return False  # the client left while it waited
        if request.deadline is not None and self._clock() >= request.deadline:
            request.future.set_exception(DeadlinePassed("the deadline passed while the request waited for a batch"))
            return False
        return True

    def _run_group(self, members: list[PendingPredict]) -> None:
        if len(members) == 1:
            self._run_alone(members[0])
            return
        try:
            outputs = self._predict(stack(members))
        except Exception as exc:  # each request's own run says whose fault it was
            self._on_batch_failure(exc)
            self._run_each(members)
            return
        parts = split(outputs, [m.rows for m in members])
        if parts is None:
            self._warn_unsplittable(outputs)
            self._run_each(members)
            return
        for request, share in zip(members, parts):
            request.future.set_result(share)

    def _run_each(self, members: list[PendingPredict]) -> None:
        for request in members:
            self._run_alone(request)

    def _run_alone(self, request: PendingPredict) -> None:
        try:
            request.future.set_result(self._predict(request.inputs))
        except Exception as exc:
            request.future.set_exception(exc)

    def _warn_unsplittable(self, outputs: Arrays) -> None:
        if self._warned_unsplittable:
            return
        self._warned_unsplittable = True
        shapes = ", ".join(f"{name} {list(np.shape(value))}" for name, value in outputs.items())
        sys.stderr.write(f"mpsd worker: Predict: the batched outputs ({shapes}) do not have the batch as their first "
                         "dimension; such requests run one at a time\n")
