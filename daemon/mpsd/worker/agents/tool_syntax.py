"""How a model writes tool calls, recognised from its chat template: one small scanner per syntax.

Three families cover the open models people serve:

* hermes (Hermes, Qwen 2/2.5/3, the demo models): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, several in a row;
* mistral (Mistral v0.3 and its tokenizer family): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
* llama3_json (Llama 3.1/3.2/3.3 JSON tool calling): the reply is one object `{"name": ..., "parameters": {...}}`,
  sometimes after `<|python_tag|>`.

A template is matched by the markers its authors wrote into it (the text the
template renders an assistant's tool calls with). A scanner reads the text
after the opening marker and says how far it is well formed, which calls it
holds (a name once its string is closed; arguments as they grow, a prefix of
the final text, so they can stream), and where the block ended. Pure: no
tokenizer, no grammar engine.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import string
from typing import Callable

WHITESPACE = " \t\r\n"
_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
_ALPHANUMERIC = string.ascii_letters + string.digits


@dataclasses.dataclass(frozen=True)
class CallScan:
    name: str | None   # None until the name's string is closed (or the call is whole, in another key order)
    arguments: str     # so far; only ever grows while the call is open
    complete: bool


@dataclasses.dataclass(frozen=True)
class BlockScan:
    calls: list[CallScan]
    end: int | None    # where the block ended (the text after it is content again); None: still open
    malformed: bool = False  # the text stopped being a tool call at `end`


@dataclasses.dataclass(frozen=True)
class ToolSyntax:
    name: str
    markers: tuple[str, ...]   # text that opens a block of calls
    arguments_key: str         # what the model writes the arguments under
    bare_json_start: bool      # a reply that starts with "{" is a call without a marker (llama3_json)
    scan: Callable[[str], BlockScan]  # the text after a marker (or from the "{" of a bare call)
    new_id: Callable[[], str]  # a call id the template accepts back


def syntax_of(template_source: str) -> ToolSyntax | None:
    """The syntax a template renders tool calls in; None when mpsd knows none of its markers."""
    if "<tool_call>" in template_source:
        return HERMES
    if "[TOOL_CALLS]" in template_source:
        return MISTRAL
    if "<|python_tag|>" in template_source or ("ipython" in template_source and '"parameters"' in template_source):
        return LLAMA3_JSON
    return None


# -- scanning -----------------------------------------------------------------


class _Malformed(Exception):
    def __init__(self, at: int) -> None:
        self.at = at


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in WHITESPACE:
        at += 1
    return at


def _value_end(text: str, start: int) -> int | None:
    """The index after the JSON object or array starting at `start`; None while it is still open."""
    depth, in_string, escaped = 0, False, False
    for at in range(start, len(text)):
        char = text[at]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return at + 1
    return None


def _scan_call(text: str, start: int) -> tuple[CallScan, int | None]:
    """One call object at `start` ("{"): its scan, and the index after it (None while open)."""
    if text[start] != "{":
        raise _Malformed(start)
    end = _value_end(text, start)
    header = _HEADER.match(text, start)
    if header is not None:
        name = json.loads(f'"{header.group(1)}"')
        value = _skip_space(text, header.end())
        if value < len(text) and text[value] == "{":
            value_end = _value_end(text, value)
            arguments = text[value:value_end] if value_end is not None else text[value:]
            return CallScan(name, arguments, end is not None), end
    if end is None:
        return CallScan(None, "", False), None
    return _whole_call(text[start:end], start), end


def _whole_call(raw: str, at: int) -> CallScan:
    """A call in another key order (or with a non-object value first): read once it is whole."""
    try:
        call = json.loads(raw)
    except ValueError:
        raise _Malformed(at) from None
    arguments = call.get("arguments", call.get("parameters")) if isinstance(call, dict) else None
    if not isinstance(call.get("name") if isinstance(call, dict) else None, str) or not isinstance(arguments, dict):
        raise _Malformed(at)
    return CallScan(call["name"], json.dumps(arguments, ensure_ascii=False), True)


def _expect(text: str, at: int, literal: str) -> int | None:
    """The index after `literal` at `at`; None while the text so far could still be it."""
    piece = text[at:at + len(literal)]
    if piece == literal:
        return at + len(literal)
    if literal.startswith(piece):
        return None
    raise _Malformed(at)


def _guarded(scan: Callable[[str, list[CallScan]], int | None]) -> Callable[[str], BlockScan]:
    def run(text: str) -> BlockScan:
        calls: list[CallScan] = []
        try:
            return BlockScan(calls, scan(text, calls))
        except _Malformed as exc:
            return BlockScan([call for call in calls if call.complete], exc.at, malformed=True)
    return run


def _next_call(text: str, at: int, calls: list[CallScan]) -> int | None:
    """The call object after blank space at `at`, added to `calls`; the index after it, None while it is open."""
    at = _skip_space(text, at)
    if at == len(text):
        return None
    call, end = _scan_call(text, at)
    calls.append(call)
    return end


def _scan_hermes(text: str, calls: list[CallScan]) -> int | None:
    """After `<tool_call>`: one object, then `</tool_call>` (the next call opens a block of its own)."""
    end = _next_call(text, 0, calls)
    return None if end is None else _expect(text, _skip_space(text, end), "</tool_call>")


def _scan_mistral(text: str, calls: list[CallScan]) -> int | None:
    """After `[TOOL_CALLS]`: a JSON array of call objects."""
    at = _skip_space(text, 0)
    if _expect(text, at, "[") is None:
        return None
    at += 1
    while (end := _next_call(text, at, calls)) is not None:
        at = _skip_space(text, end)
        if at == len(text):
            return None
        if text[at] == "]":
            return at + 1
        if text[at] != ",":
            raise _Malformed(at)
        at += 1
    return None


def _scan_llama3(text: str, calls: list[CallScan]) -> int | None:
    """One object (after `<|python_tag|>`, or the reply itself)."""
    return _next_call(text, 0, calls)


def _openai_id() -> str:
    return "call_" + secrets.token_hex(12)


def _mistral_id() -> str:
    """Mistral's templates refuse a tool_call_id that is not 9 letters and digits."""
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))


HERMES = ToolSyntax("hermes", ("<tool_call>",), "arguments", False, _guarded(_scan_hermes), _openai_id)
MISTRAL = ToolSyntax("mistral", ("[TOOL_CALLS]",), "arguments", False, _guarded(_scan_mistral), _mistral_id)
LLAMA3_JSON = ToolSyntax("llama3_json", ("<|python_tag|>",), "parameters", True, _guarded(_scan_llama3), _openai_id)
SYNTAXES = (HERMES, MISTRAL, LLAMA3_JSON)
