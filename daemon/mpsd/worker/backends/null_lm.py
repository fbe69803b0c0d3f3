"""A zero-compute language model: every step gives every sequence its next word at once.

It exists to measure mpsd itself — the scheduler, the worker's per-token
cost and the daemon's transport ceiling — with no model in the way
(benchmarks/ uses it). It goes through the same scheduler and streaming rules
as a real model, so the request path is the real one. Its vocabulary is five
words; a prompt counts one token per word.
"""

from __future__ import annotations

from typing import Callable, Sequence

from mpsd.worker.backends.base import GenerateParams, MemoryReport, StepOutput
from mpsd.worker_spec import WorkerSpec

CONTEXT_LENGTH = 1 << 20
WORDS = ("lorem ", "ipsum ", "dolor ", "sit ", "amet ")


class NullLM:
    device = "none"
    context_length = CONTEXT_LENGTH
    eos_ids = frozenset()
    kv_bytes_per_token = 0
    weights_bytes = 0
    logits_width = len(WORDS)
    prefix_cache = None  # it holds no KV to keep
    chat_template = None  # Chat answers FAILED_PRECONDITION: no template to render with

    def __init__(self) -> None:
        self._generated: dict[int, int] = {}  # sequence id -> tokens given so far

    def memory_report(self) -> MemoryReport:
        return MemoryReport({}, note="null-lm holds no model")

    def encode(self, text: str) -> list[int]:
        return [0] * len(text.split())

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        return "".join(WORDS[i] for i in ids)

    def grammar_tokenizer(self) -> None:
        return None  # no tokenizer: constrained requests are refused

    def add(self, seq_id: int, prompt_ids: list[int], params: GenerateParams, budget: int, grammar=None) -> int:
        self._generated[seq_id] = 0
        return 0

    def remove(self, seq_id: int, keep: bool = False) -> None:
        self._generated.pop(seq_id, None)

    def kv_bytes(self) -> int:
        return 0

    def step(self) -> StepOutput:
        output = StepOutput(decode_rows=len(self._generated))
        for seq_id, count in self._generated.items():
            output.tokens[seq_id] = count % len(WORDS)
            self._generated[seq_id] = count + 1
        return output


def load(spec: WorkerSpec, log: Callable[[str], None]) -> NullLM:
    return NullLM()
