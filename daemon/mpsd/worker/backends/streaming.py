"""The rules every generative backend streams by, written once.

A backend supplies token ids; this turns them into TokenEvents and one
Finished: end of text, stop sequences (held back until certain), the token
budget, and the client leaving. Frameworks differ only in how they pick ids.
"""

from __future__ import annotations

from typing import Callable, Collection, Iterable, Iterator, Sequence

from mpsd.generate_params import GenerateParams, InvalidRequest, check_against_model
from mpsd.worker.backends.base import Finished, TokenEvent
from mpsd.worker.backends.text import IncrementalDetokenizer, StopMatcher


def check_prompt(prompt_ids: Sequence[int], params: GenerateParams, context_length: int) -> None:
    if not prompt_ids:
        raise InvalidRequest("prompt: encodes to no tokens")
    if len(prompt_ids) >= context_length:
        raise InvalidRequest(
            f"prompt: {len(prompt_ids)} tokens does not fit the model's context of {context_length} tokens"
            " (leave room for at least one generated token)"
        )
    check_against_model(params, context_length)


def stream_events(
    token_ids: Iterable[int], *, prompt_ids: Sequence[int], params: GenerateParams, budget: int,
    eos_ids: Collection[int], decode: Callable[[Sequence[int]], str], keep_going: Callable[[], bool],
) -> Iterator[TokenEvent | Finished]:
    detokenizer = IncrementalDetokenizer(decode, prompt_ids)
    stops = StopMatcher(params.stop)
    steps = iter(token_ids)
    for index in range(budget):
        if not keep_going():
            return
        token_id = int(next(steps))
        if token_id in eos_ids:
            yield from _held_back(index, token_id, stops.flush())
            yield Finished("stop", len(prompt_ids), index + 1)
            return
        text, stopped = stops.feed(detokenizer.push(token_id))
        if stopped:
            yield from _held_back(index, token_id, text)
            yield Finished("stop", len(prompt_ids), index + 1)
            return
        if index == budget - 1:
            text += stops.flush()
        yield TokenEvent(index, token_id, text)
    yield Finished("length", len(prompt_ids), budget)


def _held_back(index: int, token_id: int, text: str) -> Iterator[TokenEvent]:
    """The last piece of text before a stop, if the stop left any."""
    if text:
        yield TokenEvent(index, token_id, text)
