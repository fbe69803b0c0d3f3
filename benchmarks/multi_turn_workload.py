"""The multi-turn benchmark's prompts: an agent's system prompt with tool schemas, conversations, and random text.

Every prompt goes as text to `/v1/completions`, the one endpoint every system here serves the same way: the 25M
GPT-2 has no chat template of its own (mpsd's demo one is mpsd's, not llama.cpp's or mlx_lm.server's), and a chat
endpoint would render the history with each server's own template, so the systems would prefill different
tokens. As text, the history is the same string everywhere, rendered here:

    <system prompt: instructions, then the tools as JSON schemas>
    User: <turn 1's message>
    Assistant:<the model's reply, as it was streamed>
    User: <turn 2's message>
    Assistant:

Each turn's prompt is the last one's with the reply and a new message added: the shape a chat client or an agent
sends, whose prefix a server can reuse. A run's system prompt starts with its own nonce, so nothing is reused from
an earlier run on the same server; every system in a run gets the same one, so their prompts are the same text and
greedy replies can be compared.
"""

from __future__ import annotations

import json
import random

INSTRUCTIONS = (
    "You are the agent of a hardware store. Answer in one short sentence. To get data, reply with one JSON "
    'object {"tool": NAME, "arguments": {...}}. Tools:'
)


def _tool(name: str, description: str, properties: dict[str, str], required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {key: {"type": kind} for key, kind in properties.items()},
                       "required": required}}}


TOOLS = [
    _tool("get_order", "One order by its number.", {"order_id": "string"}, ["order_id"]),
    _tool("check_stock", "Units of a product in stock.", {"sku": "string", "warehouse": "string"}, ["sku"]),
    _tool("issue_refund", "Refund an order.", {"order_id": "string", "amount": "number"}, ["order_id", "amount"]),
]

QUESTIONS = (
    "Where is order A{n}?",
    "Is SKU H{n} in stock?",
    "Refund half of order A{n}.",
    "Has order A{n} shipped yet?",
)


def system_prompt(nonce: str) -> str:
    return f"Session {nonce}. {INSTRUCTIONS}\n{json.dumps(TOOLS, separators=(',', ': '))}\n"


def user_message(conversation: int, turn: int) -> str:
    """Distinct for every conversation and turn."""
    question = QUESTIONS[(conversation + turn) % len(QUESTIONS)].format(n=100 + 37 * conversation + turn)
    return f"Ticket {conversation}.{turn}: {question}"


def render(system: str, turns: list[tuple[str, str]], message: str) -> str:
    """The prompt of a turn: the system prompt, every earlier (message, reply), then this message."""
    history = "".join(f"User: {said}\nAssistant:{reply}\n" for said, reply in turns)
    return f"{system}{history}User: {message}\nAssistant:"


class RandomText:
    """Prompts that share no prefix with each other or with the conversations, of a given length in the model's
    tokens: words drawn at random from the tokenizer's own whole-word tokens (" word"), so n words are about n
    tokens; each prompt is then cut or filled to the length by the tokenizer."""

    def __init__(self, tokenizer, seed: int) -> None:
        self._tokenizer = tokenizer
        self._random = random.Random(seed)
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self._words = sorted({t[1:] for t in vocabulary if t and t[0] == "\u0120" and t[1:].isalpha()
                              and t[1:].isascii() and len(t) > 3})
        if len(self._words) < 100:
            raise ValueError(f"the tokenizer has only {len(self._words)} whole-word tokens")

    def prompt(self, tokens: int) -> str:
        words = [self._random.choice(self._words) for _ in range(tokens)]
        text = " ".join(words)
        ids = self._tokenizer.encode(text)
        while len(ids) < tokens:
            text += " " + self._random.choice(self._words)
            ids = self._tokenizer.encode(text)
        return self._tokenizer.decode(ids[:tokens])
