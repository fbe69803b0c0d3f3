"""The grammar a Chat's reply must follow, written in llguidance's Lark: pure text, compiled in matcher.py.

* `response_format` json_object / json_schema: the reply is one JSON value
  valid under the schema;
* `tool_choice` "required" or a named function: the reply is tool calls in
  the model's own syntax (tool_syntax.py), each one's arguments valid under its
  tool's `parameters`, its name one of the tools (or the named one); one call,
  or several where `parallel_tool_calls` allows and the syntax has a way;
* "auto" with a response format: either of the two; "auto" alone is not
  constrained (the reply is read for calls, tool_syntax.py, but not forced).

JSON comes out in one fixed layout (", " and ": ", no other whitespace), which
keeps a model from spending its budget on blank space and makes the streamed
arguments the same text as the whole ones.
"""

from __future__ import annotations

import json
from typing import Callable

from mpsd.chat_params import ChatParams
from mpsd.generate_params import Constraint
from mpsd.worker.agents.tool_syntax import ToolSyntax

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}


class CannotConstrain(Exception):
    """This worker's backend has no tokenizer to constrain with (null-lm, engines): FAILED_PRECONDITION."""


# A marker's text -> its Lark term: a quoted string, or the special token it is in the model's vocabulary.
Literal = Callable[[str], str]


def quoted(text: str) -> str:
    return json.dumps(text)


def chat_constraint(chat: ChatParams, syntax: ToolSyntax | None, literal: Literal = quoted) -> Constraint | None:
    """None when the reply is free. Forced tool calls need a syntax: the caller refuses them without one."""
    forced = chat.tool_choice in ("required", "function")
    rules: list[str] = []
    starts: list[str] = []
    if chat.response_schema is not None and not forced:
        starts.append("answer")
        rules.append("answer: " + json_rule(json.loads(chat.response_schema)))
    if chat.tools and syntax is not None and (forced or (starts and chat.tool_choice == "auto")):
        starts.append("calls")
        rules += _calls_rules(chat, syntax, literal)
    if not starts:
        return None
    field = "tool_choice" if forced else "response_format.json_schema"
    return Constraint("lark", "\n".join(["start: " + " | ".join(starts), *rules]), field)


def generate_grammar(constraint: Constraint) -> str:
    """A Generate's own constraint as Lark: a JSON Schema wrapped, a grammar as given."""
    if constraint.kind == "json_schema":
        return "start: " + json_rule(json.loads(constraint.source))
    return constraint.source


def json_rule(schema) -> str:
    """A JSON value valid under `schema` (a schema of `true` allows any value), in the fixed layout."""
    body = dict(schema) if isinstance(schema, dict) else {}
    guidance = {**JSON_LAYOUT, **(body.get("x-guidance") or {})}
    return "%json " + json.dumps({**body, "x-guidance": guidance})


def _calls_rules(chat: ChatParams, syntax: ToolSyntax, literal: Literal) -> list[str]:
    names = [chat.forced_function] if chat.tool_choice == "function" else chat.tool_names()
    parameters = {tool["function"]["name"]: tool["function"].get("parameters") or ANY_OBJECT for tool in chat.tools}
    call = "call_json: " + json_rule({"anyOf": [_call_schema(name, parameters[name], syntax.arguments_key)
                                                for name in names]})
    several = chat.parallel_tool_calls and chat.tool_choice != "function"
    if syntax.name == "hermes":
        return ['calls: call ("\\n" call)*' if several else "calls: call",
                f'call: {literal("<tool_call>")} "\\n" call_json "\\n</tool_call>"', call]
    if syntax.name == "mistral":
        items = 'call_json (", " call_json)*' if several else "call_json"
        return [f'calls: {literal("[TOOL_CALLS]")} "[" {items} "]"', call]
    return ["calls: call_json", call]  # llama3_json: the reply is one call


def _call_schema(name: str, parameters: dict, arguments_key: str) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, arguments_key: parameters},
            "required": ["name", arguments_key], "additionalProperties": False}
