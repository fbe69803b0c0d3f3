"""A Chat's reply with tools, turned from text into content and tool calls before it leaves the worker.

Wraps the request's sink (sinks.py) on the decode thread: each token's text
goes through a ReplyParser (reply_parser.py), and what comes out goes on as
TokenEvents (content, the same token index) and ToolCallEvents. The Finished
carries the calls whole and says "tool_calls" when the reply made any and
ended by itself; a reply cut by max_tokens stays "length", with a detail
saying what is incomplete.
"""

from __future__ import annotations

import dataclasses

from mpsd.worker.agents.reply_parser import CallArguments, CallStart, Content, Piece, ReplyParser
from mpsd.worker.backends.base import Finished, TokenEvent, ToolCallEvent
from mpsd.worker.sinks import Event, EventSink


class ReplySink:
    def __init__(self, sink: EventSink, parser: ReplyParser) -> None:
        self._sink = sink
        self._parser = parser
        self._last = (0, 0)  # the last token's index and id: what the final pieces come with

    def put(self, event: Event) -> None:
        if type(event) is TokenEvent:
            self._last = (event.index, event.token_id)
            self._pieces(self._parser.feed(event.text), keep_empty=True)
        elif type(event) is Finished:
            pieces, detail = self._parser.finish()
            self._pieces(pieces, keep_empty=False)
            calls = tuple(self._parser.calls)
            reason = "tool_calls" if calls and event.reason == "stop" else event.reason
            self._sink.put(dataclasses.replace(event, reason=reason, tool_calls=calls, detail=event.detail or detail))
        else:
            self._sink.put(event)

    def flush(self) -> None:
        self._sink.flush()

    def closed_early(self) -> None:
        self._sink.closed_early()

    def _pieces(self, pieces: list[Piece], keep_empty: bool) -> None:
        """Every token still makes one event at least (an empty text while a marker may be starting)."""
        index, token_id = self._last
        if not pieces and keep_empty:
            self._sink.put(TokenEvent(index, token_id, ""))
        for piece in pieces:
            if type(piece) is Content:
                self._sink.put(TokenEvent(index, token_id, piece.text))
            elif type(piece) is CallStart:
                self._sink.put(ToolCallEvent(index, token_id, piece.index, id=piece.id, name=piece.name))
            elif type(piece) is CallArguments:
                self._sink.put(ToolCallEvent(index, token_id, piece.index, arguments=piece.text))
