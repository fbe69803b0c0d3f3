"""What every backend offers the worker server, independent of framework."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol, Sequence

from mpsd.generate_params import GenerateParams, InvalidRequest

if TYPE_CHECKING:
    from mpsd.worker.backends.chat import ChatTemplate

__all__ = ["BatchEngine", "BootFailure", "Finished", "GenerateParams", "InvalidRequest", "MemoryReport", "PrefixCache",
           "StepOutput", "TokenEvent", "ToolCallEvent"]


class BootFailure(RuntimeError):
    """The model cannot be loaded: the worker exits with EXIT_BOOT_FAILURE."""


@dataclasses.dataclass(frozen=True)
class TokenEvent:
    """One generated token, as a backend yields it.

    `text` is what the token adds to the answer: "" while a character or a
    possible stop sequence is incomplete, then the held-back text at once.
    """

    index: int
    token_id: int
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    """Ends a generation, after the last TokenEvent; the server turns it into the stream's final message."""

    reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the prefix cache served (not prefilled again)
    detail: str = ""        # why the answer is incomplete (max_tokens inside constrained output, or inside a call)
    tool_calls: tuple = ()  # chat_params.ToolCall of the reply (agents/reply_sink.py); reason "tool_calls" then


@dataclasses.dataclass(frozen=True)
class ToolCallEvent:
    """A piece of a tool call, in place of text: the first of a call has its id and name, the rest add arguments."""

    index: int       # the token it came with
    token_id: int
    call_index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    bytes_by_kind: dict[str, int]
    note: str = ""  # why bytes_by_kind is empty, when it is


@dataclasses.dataclass
class StepOutput:
    """What one engine step did: the token each sequence got, and which sequences cannot go on."""

    tokens: dict[int, int] = dataclasses.field(default_factory=dict)            # sequence id -> token id
    failed: dict[int, BaseException] = dataclasses.field(default_factory=dict)  # e.g. its own prefill ran out of memory
    prefill_tokens: int = 0   # prompt tokens this step processed (at most one chunk)
    decode_rows: int = 0      # sequences this step decoded a token for, together


class PrefixCache(Protocol):
    """An engine's store of earlier sequences' KV (prefix_store.PrefixStore, or mlx-lm's LRUPromptCache behind an
    adapter): measured bytes, a budget that may change at any time, least recently used out first."""

    bytes: int
    budget_bytes: int
    evictions: int

    def __len__(self) -> int: ...

    def set_budget(self, budget_bytes: int) -> None: ...

    def clear(self) -> int: ...


class BatchEngine(Protocol):
    """A language model decoding many sequences per step; only the scheduler thread calls it.

    add() queues a sequence for prefill, reusing the longest prefix its prefix
    cache holds; each step() runs at most one prefill chunk and one decode
    step for every sequence past its prefill; remove() drops a sequence
    wherever it is and frees its KV cache, or, with keep=True (it finished),
    hands its KV to the prefix cache. Sequences are independent: per-request
    temperature, top_p and seed hold in a batch.
    """

    device: str
    context_length: int
    eos_ids: frozenset[int]
    kv_bytes_per_token: int  # one token of one sequence, all layers: what a full batch is reserved by
    weights_bytes: int       # the loaded model's own tensors, measured: what a fractional prefix_cache is taken of
    chat_template: "ChatTemplate | None"  # the model's own (chat.py); None: Chat is refused
    prefix_cache: "PrefixCache | None"    # None: the engine keeps no prefix cache
    logits_width: int  # the model's output width (can exceed the tokenizer's vocabulary): a grammar mask's width

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], keep_special: bool = False) -> str:
        """keep_special: special tokens stay in the text (a tool-call marker can be one)."""

    def grammar_tokenizer(self) -> "object | None":
        """The Hugging Face tokenizer constrained decoding compiles grammars for; None: this engine cannot."""

    def add(self, seq_id: int, prompt_ids: list[int], params: GenerateParams, budget: int, grammar=None) -> int:
        """Returns how many of the prompt's tokens the prefix cache served (0 on a miss). grammar: an
        agents.matcher.RowGrammar whose mask every token this sequence samples obeys, and which it then consumes."""

    def step(self) -> StepOutput: ...

    def remove(self, seq_id: int, keep: bool = False) -> None: ...

    def kv_bytes(self) -> int:
        """KV cache held now, all sequences together (0 where the backend cannot tell)."""

    def memory_report(self) -> MemoryReport: ...


class TensorModel(Protocol):
    device: str

    def predict(self, inputs: dict[str, "object"]) -> dict[str, "object"]: ...

    def warm_up(self) -> None: ...

    def memory_report(self) -> MemoryReport: ...
