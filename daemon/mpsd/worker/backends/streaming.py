"""The rules every generative backend streams by, written once.

A backend supplies token ids; this turns them into TokenEvents and one
Finished: end of text, stop sequences (held back until certain) and the token
budget. Frameworks differ only in how they pick ids; the client leaving and
its deadline are the scheduler's to watch.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterator, Sequence

from mpsd.generate_params import GenerateParams, InvalidRequest, check_against_model
from mpsd.worker.backends.base import Finished, TokenEvent
from mpsd.worker.backends.text import IncrementalDetokenizer, StopMatcher


def check_prompt(prompt_ids: Sequence[int], params: GenerateParams, context_length: int) -> None:
    if not prompt_ids:
        raise InvalidRequest(f"{params.prompt_field}: encodes to no tokens")
    if len(prompt_ids) >= context_length:
        raise InvalidRequest(
            f"{params.prompt_field}: {len(prompt_ids)} tokens does not fit the model's context of {context_length} tokens"
            " (leave room for at least one generated token)"
        )
    check_against_model(params, context_length)


class SequenceStream:
    """One request's rules, fed a token at a time by the scheduler, whatever else shares the batch.

    push() returns the events a token gives: TokenEvents, and a Finished as
    the last one once end of text, a stop sequence or the budget is reached.
    """

    def __init__(self, *, prompt_ids: Sequence[int], params: GenerateParams, budget: int,
                 eos_ids: Collection[int], decode: Callable[[Sequence[int]], str], cached_tokens: int = 0,
                 grammar=None) -> None:
        """grammar: the request's agents.matcher.RowGrammar, which the engine feeds; the sequence ends where it
        stops, and a budget that runs out before it accepts says the output is incomplete."""
        self._prompt_tokens = len(prompt_ids)
        self._cached_tokens = cached_tokens
        self._budget = budget
        self._eos_ids = eos_ids
        self._detokenizer = IncrementalDetokenizer(decode, prompt_ids)
        self._stops = StopMatcher(params.stop)
        self._grammar = grammar
        self.generated = 0
        self.finished = False

    def push(self, token_id: int) -> list[TokenEvent | Finished]:
        index = self.generated
        self.generated += 1
        if token_id in self._eos_ids:
            return self._finish(index, token_id, self._stops.flush(), "stop")
        text, stopped = self._stops.feed(self._detokenizer.push(token_id))
        if stopped or (self._grammar is not None and self._grammar.stopped):
            return self._finish(index, token_id, text + ("" if stopped else self._stops.flush()), "stop")
        if self.generated == self._budget:
            return self._finish(index, token_id, text + self._stops.flush(), "length", last_text_always=True)
        return [TokenEvent(index, token_id, text)]

    def _finish(self, index: int, token_id: int, text: str, reason: str,
                last_text_always: bool = False) -> list[TokenEvent | Finished]:
        self.finished = True
        events: list[TokenEvent | Finished] = list(_held_back(index, token_id, text, last_text_always))
        completion = index + 1 if reason == "stop" else self._budget
        detail = ""
        if self._grammar is not None and not self._grammar.accepting:
            cause = "max_tokens ran out" if reason == "length" else "a stop sequence ended it"
            detail = f"{cause} inside the constrained output: it is incomplete and does not parse"
        events.append(Finished(reason, self._prompt_tokens, completion, self._cached_tokens, detail))
        return events


def _held_back(index: int, token_id: int, text: str, always: bool) -> Iterator[TokenEvent]:
    """The last piece of text before a stop, if the stop left any; the budget's last token always counts."""
    if text or always:
        yield TokenEvent(index, token_id, text)
