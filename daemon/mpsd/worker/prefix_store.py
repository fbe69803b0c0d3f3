"""A worker's prefix cache for engines that have no library store of their own (torch): token runs to KV.

Each entry is the KV of one finished sequence (its prompt and the answer it
generated), kept so the next turn of that conversation (history + answer +
new message) prefills only what is new. Lookup finds the entry sharing the
longest common token prefix with a prompt, as mlx-lm's LRUPromptCache does
(the MLX engine uses that one): a shorter entry is used whole, a longer one is
cut to the common part, and at least the prompt's last token is left to
prefill, since the first sampled token needs its logits. Inserting a run
drops entries that are its prefixes: the longer one serves them too.

Bounded in bytes, measured from the payloads themselves (the engine's
`nbytes`, the tensors' own sizes), least recently used first out. The budget
can change at any time (the daemon shrinks it to make room for another
worker); an entry larger than the whole budget is not kept.

Framework-free: payloads are opaque; the engine copies and cuts them.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Generic, Sequence, TypeVar

Payload = TypeVar("Payload")


@dataclasses.dataclass
class PrefixCacheFigures:
    """What a prefix cache reports in WorkerStats.prefix_cache; every engine fills the same fields."""

    bytes: int = 0
    budget_bytes: int = 0
    configured_bytes: int = 0
    entries: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    evictions: int = 0


@dataclasses.dataclass(frozen=True)
class Match(Generic[Payload]):
    tokens: tuple[int, ...]  # the entry's own tokens
    payload: Payload
    reuse: int               # prompt tokens its KV serves: the payload is to be cut to this many


class PrefixStore(Generic[Payload]):
    def __init__(self, budget_bytes: int, nbytes: Callable[[Payload], int]) -> None:
        self._nbytes = nbytes
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[Payload, int]] = collections.OrderedDict()
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, prompt: Sequence[int]) -> Match[Payload] | None:
        """The entry serving the longest part of the prompt (always leaving its last token), marked recently used."""
        prompt = tuple(prompt)
        best, best_common = None, 0
        for tokens in self._entries:
            common = common_prefix_length(tokens, prompt)
            if common > best_common:
                best, best_common = tokens, common
        reuse = min(best_common, len(prompt) - 1)
        if best is None or reuse <= 0:
            return None
        self._entries.move_to_end(best)
        return Match(best, self._entries[best][0], reuse)

    def insert(self, tokens: Sequence[int], payload: Payload) -> None:
        tokens = tuple(tokens)
        size = self._nbytes(payload)
        if not tokens or size > self.budget_bytes:
            return
        for held in [t for t in self._entries if len(t) <= len(tokens) and tokens[:len(t)] == t]:
            self._drop(held)
        self._entries[tokens] = (payload, size)
        self.bytes += size
        self._fit()

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._fit()

    def clear(self) -> int:
        """Drops every entry (an out-of-memory error needs the memory back); returns how many were dropped."""
        dropped = len(self._entries)
        self.evictions += dropped
        self._entries.clear()
        self.bytes = 0
        return dropped

    def _fit(self) -> None:
        while self.bytes > self.budget_bytes and self._entries:
            self._drop(next(iter(self._entries)))
            self.evictions += 1

    def _drop(self, tokens: tuple[int, ...]) -> None:
        _, size = self._entries.pop(tokens)
        self.bytes -= size


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Binary search on slice equality: the comparisons run in C, so a 4k-token history costs microseconds."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def resolve_budget(configured_bytes: int | None, fraction: float | None, footprint_bytes: int) -> int:
    """prefix_cache as bytes: a size as given, a fraction of the worker's own measured footprint, 0 when off."""
    if configured_bytes is not None:
        return configured_bytes
    if fraction is not None:
        return int(fraction * footprint_bytes)
    return 0
