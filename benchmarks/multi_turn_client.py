"""The multi-turn benchmark's client: streamed, greedy /v1/completions requests, C conversations of T turns at once.

Every system gets the same client: one thread per conversation, each sending its turns one after another, timed
from the send to the first text event (TTFT) and to the end; the usage of the last event gives the prompt,
cached and completion tokens where the server reports them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
from collections.abc import Callable

from benchmarks import http_streams, interference
from benchmarks.peer_install import PeerError

PromptFor = Callable[[int, int, list], str]   # (conversation, turn, its earlier replies) -> the prompt
STAGGER_S = 0.001


@dataclasses.dataclass
class Reply:
    conversation: int
    turn: int
    sent_at: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    text: str = ""
    events: int = 0                     # text events streamed
    prompt_tokens: int | None = None    # from usage, else counted here with the model's tokenizer
    cached_tokens: int | None = None    # usage.prompt_tokens_details.cached_tokens (or the server's log)
    completion_tokens: int | None = None
    error: str = ""


def complete(port: int, prompt: str, max_tokens: int, reply: Reply) -> Reply:
    """One streamed, greedy /v1/completions request, timed from its send to its first text and its end."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    reply.sent_at = started = time.perf_counter()
    texts = []
    try:
        for event in http_streams.sse_events(port, "/v1/completions", body):
            if "error" in event:
                raise PeerError(f"error in the stream: {str(event['error'])[:200]}")
            usage = event.get("usage")
            if usage:
                reply.prompt_tokens = usage.get("prompt_tokens")
                reply.completion_tokens = usage.get("completion_tokens")
                details = usage.get("prompt_tokens_details") or {}
                reply.cached_tokens = details.get("cached_tokens")
            choices = event.get("choices") or []
            if choices and choices[0].get("text"):
                if not texts:
                    reply.ttft_s = time.perf_counter() - started
                texts.append(choices[0]["text"])
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure of the run
        reply.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    reply.total_s = time.perf_counter() - started
    reply.text, reply.events = "".join(texts), len(texts)
    if not texts and not reply.error:  # left out of the figures either way; say which it was
        reply.error = ("ended before any text (its first token was end of text)" if reply.completion_tokens == 0
                       else "no text streamed")
    return reply


def drive(port: int, conversations: int, turns: int, max_tokens: int, prompt_for: PromptFor) -> dict:
    """conversations at once, each sending its turns one after another (a failed turn ends its conversation):
    {"replies", "wall_s", "others_cores", "prompts"} with every prompt sent, by (conversation, turn)."""
    prompts: dict[tuple[int, int], str] = {}
    lock = threading.Lock()

    def conversation(index: int) -> list[Reply]:
        replies: list[Reply] = []
        for turn in range(1, turns + 1):
            prompt = prompt_for(index, turn, replies)
            with lock:
                prompts[(index, turn)] = prompt
            replies.append(complete(port, prompt, max_tokens, Reply(index, turn)))
            if replies[-1].error:
                break
        return replies

    before = interference.snapshot()
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(conversations) as pool:
        futures = []
        for index in range(conversations):
            futures.append(pool.submit(conversation, index))
            time.sleep(STAGGER_S)
        replies = [reply for future in futures for reply in future.result()]
    wall = time.perf_counter() - started
    return {"replies": replies, "wall_s": wall, "prompts": prompts,
            "others_cores": interference.others_cores(before, interference.snapshot())}
