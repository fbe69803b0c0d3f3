"""A reply read as it streams: its text, and the tool calls the model wrote in its own syntax (tool_syntax.py).

Text goes out as it comes, except what might be the start of a tool-call
marker, which waits until it is one or is not (as a stop sequence does). Inside
a block of calls nothing is content: a call goes out as soon as its name is
known (index, id, name), then its arguments in pieces as they are generated,
so the pieces of one call joined are its arguments, and what the stream sent
is what the whole reply holds. Text that turns out not to be a call (a marker
followed by something else, or a bare "{" that is no call) is given back as
content, unless a call of that block has gone out already.
"""

from __future__ import annotations

import dataclasses

from mpsd.chat_params import ToolCall
from mpsd.worker.agents.tool_syntax import WHITESPACE, ToolSyntax


@dataclasses.dataclass(frozen=True)
class Content:
    text: str


@dataclasses.dataclass(frozen=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclasses.dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Piece = Content | CallStart | CallArguments


class ReplyParser:
    def __init__(self, syntax: ToolSyntax) -> None:
        self._syntax = syntax
        self._held = ""             # content that may be the start of a marker
        self._block: str | None = None  # text of the open block of calls (after its marker); None: in content
        self._marker = ""           # the marker that opened it ("" for a bare call)
        self._block_first = 0       # index of the block's first call
        self._started_any = False   # content or a call went out: a bare "{" is no longer a call
        self._after_calls = False   # nothing but blank space since a block of calls closed
        self.calls: list[ToolCall] = []
        self._sent: list[int] = []  # characters of each call's arguments sent so far

    def feed(self, text: str) -> list[Piece]:
        pieces: list[Piece] = []
        if self._block is not None:
            self._block += text
            return self._advance_block(pieces, final=False)
        self._held += text
        return self._advance_content(pieces)

    def finish(self) -> tuple[list[Piece], str]:
        """The rest, once the reply ended; and why it is incomplete ("" when it is not)."""
        pieces: list[Piece] = []
        if self._block is not None:  # feed() closes a block as soon as it ends: this one is still open
            self._advance_block(pieces, final=True)
        if self._block is not None:  # ended inside a call whose name went out
            return pieces, f"the reply ended inside tool call {len(self.calls) - 1}: its arguments are incomplete"
        if self._held:
            self._content(self._held, pieces)
            self._held = ""
        return pieces, ""

    # -- content --------------------------------------------------------------

    def _advance_content(self, pieces: list[Piece]) -> list[Piece]:
        syntax = self._syntax
        if syntax.bare_json_start and not self._started_any:
            stripped = self._held.lstrip(WHITESPACE)
            if not stripped:
                return pieces
            if stripped.startswith("{"):
                self._held = ""
                return self._open_block("", stripped, pieces)
        found = min(((self._held.find(marker), marker) for marker in syntax.markers if marker in self._held),
                    default=None)
        if found is not None:
            at, marker = found
            self._content(self._held[:at], pieces)
            rest, self._held = self._held[at + len(marker):], ""
            return self._open_block(marker, rest, pieces)
        keep = _partial_marker(self._held, syntax.markers)
        self._content(self._held[:len(self._held) - keep], pieces)
        self._held = self._held[len(self._held) - keep:]
        return pieces

    def _content(self, text: str, pieces: list[Piece]) -> None:
        """Blank space right after calls (between them, or ending the reply) is layout, not content."""
        if self._after_calls:
            text = text.lstrip(WHITESPACE)
            self._after_calls = not text
        if text:
            self._started_any = True
            pieces.append(Content(text))

    # -- a block of calls -----------------------------------------------------------

    def _open_block(self, marker: str, text: str, pieces: list[Piece]) -> list[Piece]:
        self._block, self._marker, self._block_first = text, marker, len(self.calls)
        self._started_any = True
        return self._advance_block(pieces, final=False)

    def _advance_block(self, pieces: list[Piece], final: bool) -> list[Piece]:
        scan = self._syntax.scan(self._block)
        for offset, call in enumerate(scan.calls):
            index = self._block_first + offset
            if call.name is None:
                break
            if index == len(self.calls):
                self.calls.append(ToolCall(self._syntax.new_id(), call.name, ""))
                self._sent.append(0)
                pieces.append(CallStart(index, self.calls[index].id, call.name))
            if len(call.arguments) > self._sent[index]:
                pieces.append(CallArguments(index, call.arguments[self._sent[index]:]))
                self._sent[index] = len(call.arguments)
                self.calls[index] = self.calls[index]._replace(arguments=call.arguments)
        if scan.end is None and not final:
            return pieces
        started = len(self.calls) > self._block_first
        block, marker = self._block, self._marker
        if scan.end is None:  # the reply ended with the block open
            if not started:
                self._block = None
                pieces.append(Content(marker + block))
            return pieces  # else: cut inside a call, which finish() says
        self._block = None
        if scan.malformed and not started:  # not a call after all: content, the rest looked at again
            pieces.append(Content(marker + block[:scan.end]))
        self._after_calls = started
        self._held = block[scan.end:]
        return self._advance_content(pieces)


def _partial_marker(text: str, markers: tuple[str, ...]) -> int:
    """How many characters at the end of `text` could begin a marker."""
    longest = 0
    for marker in markers:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if marker.startswith(text[-size:]):
                longest = max(longest, size)
                break
    return longest
