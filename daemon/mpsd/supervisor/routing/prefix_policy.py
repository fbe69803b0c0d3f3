"""Prefix-aware routing: which text a request is routed by, and whether it follows its prefix or the load.

The rule is SGLang's router's cache-aware policy, with least-loaded where it
would pick the worker with the smallest tree: when the pool is imbalanced (the
busiest worker has more than balance_abs_threshold requests in flight beyond
the least busy, capped at a quarter of a worker's concurrency, and more than
balance_rel_threshold times as many), least loaded; otherwise the worker holding the longest prefix of the request's text,
if that covers more than cache_threshold of the text and the worker has a free
slot; otherwise least loaded.

The text of a Generate is its prompt. The text of a Chat is a canonical form
of its tools and messages in which the separators cannot occur in a role or a
content (they are escaped there), so two different conversations never share
a key, and a conversation's next turn extends this turn's key plus its answer:
    chat_routing_key(m) + chat_answer_suffix(a)  is a prefix of
    chat_routing_key(m + [assistant a] + [user ...]).

Pure: no I/O, no clock, no asyncio.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from mpsd.config.schema import RoutingThresholds

ESCAPE = "\x1b"
MESSAGE = "\x1e"  # starts a message: MESSAGE role ROLE_END content
ROLE_END = "\x1f"
TOOLS = "\x1d"    # starts the tools' JSON, before the first message
_ESCAPED = str.maketrans({c: ESCAPE + c for c in (ESCAPE, MESSAGE, ROLE_END, TOOLS)})


class Message(Protocol):
    role: str
    content: str


class Worker(Protocol):
    """What the policy reads of a pool's slot."""

    worker_id: str
    inflight: int
    last_assigned: int


W = TypeVar("W", bound=Worker)


def _escaped(text: str) -> str:
    return text.translate(_ESCAPED) if any(c in text for c in (ESCAPE, MESSAGE, ROLE_END, TOOLS)) else text


def chat_message_key(role: str, content: str, escaped: bool = False) -> str:
    return MESSAGE + _escaped(role) + ROLE_END + (content if escaped else _escaped(content))


def chat_routing_key(messages: Iterable[Message], tools_json: str = "") -> str:
    """The text a Chat is routed by: its tools (they come first in a template) and its messages in order."""
    head = TOOLS + _escaped(tools_json) if tools_json else ""
    return head + "".join(_message_key(m) for m in messages)


def _message_key(message: Message) -> str:
    """A message's key; an assistant's tool calls follow its content, each after a TOOLS separator (which content
    cannot hold unescaped)."""
    calls = getattr(message, "tool_calls", ())
    if not calls:
        return chat_message_key(message.role, message.content)
    text = _escaped(message.content) + "".join(TOOLS + _escaped(f"{c.id}\x00{c.name}\x00{c.arguments}")
                                               for c in calls)
    return chat_message_key(message.role, text, escaped=True)


def chat_answer_suffix(answer: str) -> str:
    """What a worker holds after answering a Chat, beyond its key: the answer as the next turn's assistant message."""
    return chat_message_key("assistant", answer)


def balance_abs_threshold(thresholds: RoutingThresholds, concurrency: int) -> int:
    """The absolute imbalance that turns routing to least loaded: the configured one, at most a quarter of a worker's
    concurrency. SGLang's 32 is sized for engines that run hundreds of sequences; a worker here runs `concurrency`
    (16 by default), so 32 more in flight can never happen and a prefix every request shares (an agent's system
    prompt) would pile all of them on one worker while the others idle."""
    return min(thresholds.balance_abs_threshold, max(1, concurrency // 4))


def imbalanced(loads: list[int], thresholds: RoutingThresholds, concurrency: int | None = None) -> bool:
    """concurrency: a worker's, which caps the absolute threshold (balance_abs_threshold); None: uncapped."""
    if not loads:
        return False
    busiest, idlest = max(loads), min(loads)
    limit = thresholds.balance_abs_threshold if concurrency is None else balance_abs_threshold(thresholds, concurrency)
    return busiest - idlest > limit and busiest > thresholds.balance_rel_threshold * idlest


def follow_prefix(workers: Sequence[W], concurrency: int, matched: Mapping[str, int], text_chars: int,
                  thresholds: RoutingThresholds) -> W | None:
    """The worker a request whose text is text_chars long follows its prefix to, given how much of the text each
    worker holds (matched: characters by worker id); None: route it least loaded instead.
    workers: the ones it may go to (a retry's lost worker left out), free or not."""
    if not workers or not text_chars or imbalanced([w.inflight for w in workers], thresholds, concurrency):
        return None
    best = max(workers, key=lambda w: (matched.get(w.worker_id, 0), -w.inflight, -w.last_assigned))
    if matched.get(best.worker_id, 0) / text_chars > thresholds.cache_threshold and best.inflight < concurrency:
        return best
    return None
