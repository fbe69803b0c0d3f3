"""`mpsctl chat`: a conversation with a model on a terminal, or one reply for a script.

On a terminal it keeps the conversation (each turn sends the whole of it, as
chat APIs do) and streams each reply as it comes; Ctrl-C stops a reply and
forgets that turn, Ctrl-D or Ctrl-C at the prompt ends. With a MESSAGE, or
with stdin not a terminal, the message (or all of stdin) is sent once and the
reply printed, like `mpsctl generate`.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from mpsd.client import Client, MpsdError

PROMPT = "you> "


def run_chat(client: Client, model: str, system: str | None, message: str | None, options: dict[str, Any],
             timeout: float, stdin: TextIO = sys.stdin) -> int:
    opening = [{"role": "system", "content": system}] if system else []
    if message is None and stdin.isatty():
        return _conversation(client, model, opening, options, timeout, stdin)
    text = message if message is not None else stdin.read()
    if not text.strip():
        print("mpsctl: nothing to send: give a MESSAGE or pipe text to stdin", file=sys.stderr)
        return 2
    stream = client.chat(opening + [{"role": "user", "content": text}], model, timeout=timeout, **options)
    _print_reply(stream)
    finish = stream.finish
    print(f"[{finish.reason}: {finish.prompt_tokens} prompt + {finish.completion_tokens} generated tokens, "
          f"worker {finish.worker_id} pid {finish.worker_pid}]", file=sys.stderr)
    return 0


def _conversation(client: Client, model: str, history: list[dict[str, str]], options: dict[str, Any], timeout: float,
                  stdin: TextIO) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    print(f"chatting with {model or 'the only model'} at {client.address}: Ctrl-C stops a reply, Ctrl-D ends",
          file=sys.stderr)
    while True:
        try:
            line = input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        turn = history + [{"role": "user", "content": line}]
        stream = client.chat(turn, model, timeout=timeout, **options)
        try:
            reply = _print_reply(stream)
        except KeyboardInterrupt:
            stream.cancel()
            print("\n[stopped; this turn is forgotten]", file=sys.stderr)
            continue
        except MpsdError as exc:  # e.g. the conversation outgrew the model's context: say so and go on
            print(f"mpsctl: {exc}", file=sys.stderr)
            continue
        history = turn + [{"role": "assistant", "content": reply}]


def _print_reply(stream) -> str:
    pieces = []
    for token in stream:
        pieces.append(token.text)
        sys.stdout.write(token.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)
