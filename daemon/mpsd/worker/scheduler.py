"""The decode loop: one thread owns the model and the device, however many clients there are.

Other threads only hand requests in (`submit`); each request's events go to
its sink (sinks.py), flushed once per pass so that a step's tokens for every
sequence reach the daemon as one message (step_outbox.py).

Each pass of the loop takes in new requests, lets go of the ones whose client
left or whose deadline passed, and asks the engine for one step: a prefill chunk for joining prompts and one token for every running
sequence. Each token goes through that request's own SequenceStream (end of
text, stop sequences, budget); a finished sequence leaves the engine at once,
which frees its KV cache. One thread touching the device is also what makes
MPS and MLX safe, which are not for several threads at a time.

An engine (backends/*) knows its framework; this loop knows requests.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import threading
import time
import traceback
from typing import Callable, Iterator

from mpsd.generate_params import GenerateParams, InvalidRequest
from mpsd.oom import exception_oom
from mpsd.worker.backends.base import BatchEngine, Finished, StepOutput, TokenEvent
from mpsd.worker.backends.streaming import SequenceStream, check_prompt
from mpsd.worker.prefix_store import PrefixCacheFigures
from mpsd.worker.sinks import EventSink, QueueSink

IDLE_WAIT_S = 0.5
STEP_HISTORY = 4096  # recent steps kept for tests and status: what each step did


class DeadlinePassed(Exception):
    """The client's deadline passed while its sequence was in the batch."""


class OutOfMemory(Exception):
    """This sequence could not be given memory; the others in the batch go on."""


@dataclasses.dataclass(eq=False)
class Submission:
    """One request, shared by the thread that hands it in and the scheduler thread (which puts its events)."""

    params: GenerateParams
    deadline: float | None  # time.monotonic() seconds
    wake: Callable[[], None]
    sink: EventSink = dataclasses.field(default_factory=QueueSink)  # where its events go (sinks.py)
    grammar: object = None      # agents.matcher.RowGrammar its tokens must follow, or None
    keep_special: bool = False  # its text keeps special tokens (a tool-call marker can be one)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def cancel(self) -> None:
        """From any thread: the scheduler drops the sequence before its next step."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self.sink.closed_early()
            self.wake()

    def __iter__(self) -> Iterator[TokenEvent | Finished]:
        """A QueueSink's events: TokenEvents then one Finished; raises the request's failure; ends if cancelled."""
        return iter(self.sink)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    prefill_tokens: int
    decode_rows: int
    seconds: float


@dataclasses.dataclass
class _Running:
    submission: Submission
    stream: SequenceStream


class DecodeScheduler:
    def __init__(self, engine: BatchEngine, max_sequences: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._engine = engine
        self._max_sequences = max_sequences
        self._clock = clock
        self._inbox: collections.deque[Submission] = collections.deque()
        self._wakeup = threading.Condition()
        self._running: dict[int, _Running] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._stopped = threading.Event()
        self.steps: collections.deque[StepRecord] = collections.deque(maxlen=STEP_HISTORY)
        self.kv_bytes = 0  # written by the scheduler thread after each step; read by Stats
        self.prefix_cache = PrefixCacheFigures()  # replaced whole by the scheduler thread; read by Stats
        self._prefix_budget: int | None = None  # a new budget for the prefix cache, applied by the scheduler thread
        self._configured_budget: int | None = None  # configure_prefix_cache's, likewise
        self._touched: set[EventSink] = set()  # sinks given events since the last flush (scheduler thread only)
        self._thread = threading.Thread(target=self._loop, name="mpsd-decode", daemon=True)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def kv_reserve_bytes(self) -> int:
        """KV cache a full batch of full-context sequences would hold: what admission must leave room for."""
        return self._engine.kv_bytes_per_token * self._engine.context_length * self._max_sequences

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Returns once the loop has stopped; the thread itself stays parked (see _park)."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        self._stopped.wait()

    def configure_prefix_cache(self, budget_bytes: int) -> None:
        """After the warm-up: the budget prefix_cache resolved to, reported as configured_bytes, with the counters
        started afresh (the warm-up's prompt is no client's). Applied by the scheduler thread, the figures' owner."""
        if self._engine.prefix_cache is None:
            return
        with self._wakeup:
            self._configured_budget = self._prefix_budget = budget_bytes
            self._wakeup.notify()

    def set_prefix_cache_budget(self, budget_bytes: int) -> None:
        """From any thread (the daemon's Stats probe): the scheduler thread applies it before its next step."""
        if self._engine.prefix_cache is None:
            return
        with self._wakeup:
            self._prefix_budget = budget_bytes
            self._wakeup.notify()

    def submit(self, params: GenerateParams, deadline: float | None = None, sink: EventSink | None = None,
               grammar=None, keep_special: bool = False) -> Submission:
        """sink: where the request's events go (default: the Submission's own queue, read by iterating it).
        grammar: a RowGrammar compiled for it (agents/matcher.py) that every token it samples must follow."""
        submission = Submission(params, deadline, self._wake, sink or QueueSink(), grammar, keep_special)
        with self._wakeup:
            self._inbox.append(submission)
            self._wakeup.notify()
        return submission

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify()

    # -- the scheduler thread ------------------------------------------------

    def _loop(self) -> None:
        try:
            self._decode_until_stopped()
        finally:
            self._stopped.set()
        _park()

    def _decode_until_stopped(self) -> None:
        while True:
            with self._wakeup:
                while not self._stopping and not self._inbox and not self._running and self._prefix_budget is None:
                    self._wakeup.wait(IDLE_WAIT_S)
                if self._stopping:
                    return
                joining = self._take_joining()
                budget, self._prefix_budget = self._prefix_budget, None
                configured, self._configured_budget = self._configured_budget, None
            if configured is not None:
                self.prefix_cache = PrefixCacheFigures(configured_bytes=configured)
            if budget is not None:
                self._engine.prefix_cache.set_budget(budget)
                self._count_prefix_cache()
            for submission in joining:
                self._join(submission)
            self._let_go()
            if self._running:
                self._step()
            self._flush()

    def _take_joining(self) -> list[Submission]:
        room = self._max_sequences - len(self._running)
        joining = []
        while self._inbox and len(joining) < room:
            joining.append(self._inbox.popleft())
        return joining

    def _join(self, submission: Submission) -> None:
        """Tokenizes and checks the prompt here, on the thread that owns the model; bad input fails alone."""
        if submission.cancelled.is_set():
            return
        engine, params = self._engine, submission.params
        try:
            prompt_ids = engine.encode(params.prompt)
            check_prompt(prompt_ids, params, engine.context_length)
        except InvalidRequest as exc:
            self._emit(submission, exc)
            return
        budget = min(params.max_tokens, engine.context_length - len(prompt_ids))
        seq_id = next(self._ids)
        grammar = submission.grammar
        try:
            cached = engine.add(seq_id, prompt_ids, params, budget, grammar=grammar) if grammar is not None else \
                engine.add(seq_id, prompt_ids, params, budget)
        except Exception as exc:  # noqa: BLE001  (copying a cached prefix can run out of memory: this request only)
            if not exception_oom(exc):
                raise
            engine.remove(seq_id)
            self._free_prefix_cache()
            self._emit(submission, _as_failure(exc))
            return
        self._count_prefix_cache(hit=cached, miss=len(prompt_ids) - cached)
        decode = (lambda ids: engine.decode(ids, keep_special=True)) if submission.keep_special else engine.decode
        stream = SequenceStream(prompt_ids=prompt_ids, params=params, budget=budget, eos_ids=engine.eos_ids,
                                decode=decode, cached_tokens=cached, grammar=grammar)
        self._running[seq_id] = _Running(submission, stream)

    def _let_go(self) -> None:
        """Sequences whose client left or whose deadline passed leave before the next step."""
        now = self._clock()
        for seq_id, running in list(self._running.items()):
            submission = running.submission
            if submission.cancelled.is_set():
                self._leave(seq_id)
            elif submission.deadline is not None and now >= submission.deadline:
                self._leave(seq_id, DeadlinePassed("the request's deadline passed while it was generating"))

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            output = self._engine.step()
        except Exception as exc:  # noqa: BLE001  (the batch must survive what one step raised)
            self._step_failed(exc)
            return
        self.steps.append(StepRecord(output.prefill_tokens, output.decode_rows, time.perf_counter() - started))
        if any(exception_oom(exc) for exc in output.failed.values()):
            self._free_prefix_cache()
        for seq_id, exc in output.failed.items():
            self._leave(seq_id, _as_failure(exc))
        for seq_id, token_id in output.tokens.items():
            self._deliver(seq_id, token_id)
        self.kv_bytes = self._engine.kv_bytes()

    def _deliver(self, seq_id: int, token_id: int) -> None:
        running = self._running.get(seq_id)
        if running is None:
            return
        for event in running.stream.push(token_id):
            self._emit(running.submission, event)
        if running.stream.finished:
            self._leave(seq_id)

    def _step_failed(self, exc: Exception) -> None:
        """Out of memory: the youngest sequence gives its memory back and fails; the rest try again.
        Anything else is a bug in the step: every sequence in it fails with the error, the worker lives."""
        if exception_oom(exc) and self._running:
            self._free_prefix_cache()
            self._leave(max(self._running), _as_failure(exc))
            return
        traceback.print_exc()
        for seq_id in list(self._running):
            self._leave(seq_id, exc)

    def _leave(self, seq_id: int, failure: BaseException | None = None) -> None:
        running = self._running.get(seq_id)
        if running is None:
            return
        self._engine.remove(seq_id, keep=failure is None and running.stream.finished)
        self.kv_bytes = self._engine.kv_bytes()
        self._count_prefix_cache()
        del self._running[seq_id]  # after its KV is gone, so Stats never shows KV for no sequence
        if failure is not None:
            self._emit(running.submission, failure)
        elif not running.stream.finished:
            running.submission.sink.closed_early()

    def _emit(self, submission: Submission, event) -> None:
        submission.sink.put(event)
        self._touched.add(submission.sink)

    def _flush(self) -> None:
        """Once per pass of the loop: every event of a step becomes visible together (one message to the daemon)."""
        if self._touched:
            for sink in self._touched:
                sink.flush()
            self._touched.clear()

    def _free_prefix_cache(self) -> None:
        """Out of memory: the prefix cache gives everything back first; it is only ever a saving."""
        if self._engine.prefix_cache is not None:
            self._engine.prefix_cache.clear()
            self._count_prefix_cache()

    def _count_prefix_cache(self, hit: int = 0, miss: int = 0) -> None:
        """A fresh figures object each time, so Stats on another thread never reads one half-written."""
        cache, figures = self._engine.prefix_cache, self.prefix_cache
        held = (cache.bytes, cache.budget_bytes, len(cache), cache.evictions) if cache is not None else (0, 0, 0, 0)
        self.prefix_cache = PrefixCacheFigures(
            bytes=held[0], budget_bytes=held[1], configured_bytes=figures.configured_bytes, entries=held[2],
            hit_tokens=figures.hit_tokens + hit, miss_tokens=figures.miss_tokens + miss, evictions=held[3])


def _park() -> None:
    """The decode thread never exits: MLX keeps a compile cache per thread whose destructor takes the GIL, and a
    thread ending while the interpreter shuts down aborts the process (std::terminate, seen in about a third of
    worker exits). A parked daemon thread is simply frozen at exit, as grpc's pool threads are."""
    threading.Event().wait()


def _as_failure(exc: BaseException) -> BaseException:
    """An out-of-memory error becomes OutOfMemory naming what ran out; others pass as they are."""
    meaning = exception_oom(exc)
    return OutOfMemory(f"out of memory ({meaning}): {exc}") if meaning else exc


__all__ = ["DeadlinePassed", "DecodeScheduler", "OutOfMemory", "StepOutput", "StepRecord", "Submission"]
