"""Streaming text helpers shared by generative backends; no framework imports.

Streaming must never show a client half a UTF-8 character nor the first
characters of a stop sequence that later completes, so text is released only
once it is certain.
"""

from __future__ import annotations

from typing import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns token ids into text pieces, one call per token.

    Decoding each token alone splits multi-byte characters and drops the
    spaces some tokenizers attach to neighbours, so each step decodes a short
    window of recent tokens and releases only what the window added, holding
    back while the window ends in an incomplete character.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(prompt_ids[-4:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text):]


class StopMatcher:
    """Finds stop sequences across token boundaries.

    feed() returns the text that is safe to emit and whether a stop sequence
    was reached; text that could still become a stop sequence is held back.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            safe = self._pending[:min(hits)]
            self._pending = ""
            return safe, True
        keep = self._longest_partial_stop()
        safe, self._pending = self._pending[:len(self._pending) - keep], self._pending[len(self._pending) - keep:]
        return safe, False

    def flush(self) -> str:
        """Releases held-back text when generation ends without a stop."""
        text, self._pending = self._pending, ""
        return text

    def _longest_partial_stop(self) -> int:
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:length]):
                    longest = length
                    break
        return longest
