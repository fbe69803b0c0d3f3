"""A zero-compute language model: yields tokens as fast as Python can.

It exists to measure mpsd itself — the daemon's per-token cost and its
transport ceiling — with no model in the way (benchmarks/ uses it). It honours
the same parameters as a real model so the request path is the real one.
"""

from __future__ import annotations

from typing import Callable, Iterator

from mpsd.worker.backends.base import Finished, GenerateParams, MemoryReport, TokenEvent
from mpsd.worker.backends.text import StopMatcher
from mpsd.worker_spec import WorkerSpec

CONTEXT_LENGTH = 1 << 20
WORDS = ("lorem ", "ipsum ", "dolor ", "sit ", "amet ")


class NullLM:
    device = "none"
    context_length = CONTEXT_LENGTH

    def warm_up(self) -> None:
        """Nothing to warm."""

    def memory_report(self) -> MemoryReport:
        return MemoryReport({}, note="null-lm holds no model")

    def generate(self, params: GenerateParams, keep_going: Callable[[], bool]) -> Iterator[TokenEvent | Finished]:
        prompt_tokens = max(1, len(params.prompt.split()))
        stops = StopMatcher(params.stop)
        for index in range(params.max_tokens):
            if not keep_going():
                return
            text, stopped = stops.feed(WORDS[index % len(WORDS)])
            if stopped:
                if text:
                    yield TokenEvent(index, index % len(WORDS), text)
                yield Finished("stop", prompt_tokens, index + 1)
                return
            yield TokenEvent(index, index % len(WORDS), text)
        yield Finished("length", prompt_tokens, params.max_tokens)


def load(spec: WorkerSpec, log: Callable[[str], None]) -> NullLM:
    return NullLM()
