"""The meaning of a ChatRequest: its messages, tools, tool choice, response format and sampling, shared by daemon and worker.

The daemon checks a Chat before it takes a worker slot, as it does a Generate
(generate_params.py); the worker reads the request again with the same
function, then renders the messages with the model's own chat template
(worker/backends/chat.py). What only the template or the grammar engine can
tell — whether it has one, takes tools, which tool-call syntax it uses, whether
a JSON Schema's features are supported — is checked there.

Everything here names the field at fault, as OpenAI's API does: a named
tool_choice that is not among the tools, a "tool" message answering no call
made before it, arguments that are not a JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, NamedTuple

from mpsd.generate_params import GenerateParams, InvalidRequest, check_prompt_length, parse_json_schema, sampling_params

CHAT_ROLES = ("system", "user", "assistant", "tool")  # "tool" only where the template takes it
TOOL_CHOICE_MODES = ("auto", "none", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for a function's name
ANY_OBJECT = '{"type": "object"}'  # json_object: any JSON object


class ToolCall(NamedTuple):
    id: str
    name: str
    arguments: str  # JSON text of an object


class ChatMessage(NamedTuple):
    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


@dataclasses.dataclass(frozen=True)
class ChatParams:
    messages: tuple[ChatMessage, ...]
    tools: tuple[dict, ...] | None  # tool definitions for the template's `tools`; None when there are none
    sampling: GenerateParams        # its prompt is "" until the worker renders the messages
    tool_choice: str = "auto"       # "auto", "none", "required", or "function" (forced_function, exactly once)
    forced_function: str = ""
    parallel_tool_calls: bool = True
    response_schema: str | None = None  # JSON Schema text the reply's text must satisfy; None: free text

    @property
    def calls_tools(self) -> bool:
        """Whether the reply is read for tool calls: tools were given and the choice is not "none"."""
        return bool(self.tools) and self.tool_choice != "none"

    def tool_names(self) -> list[str]:
        return [tool["function"]["name"] for tool in self.tools or ()]

    def template_messages(self) -> list[dict[str, Any]]:
        """The messages as chat templates read them (transformers' convention): an assistant's tool calls with their
        arguments as a mapping, a tool message with its call's id and function name."""
        names = {call.id: call.name for message in self.messages for call in message.tool_calls}
        rendered = []
        for message in self.messages:
            entry: dict[str, Any] = {"role": message.role, "content": message.content}
            if message.tool_calls:
                entry["tool_calls"] = [{"id": call.id, "type": "function",
                                        "function": {"name": call.name, "arguments": json.loads(call.arguments)}}
                                       for call in message.tool_calls]
            if message.role == "tool":
                entry["tool_call_id"] = message.tool_call_id
                entry["name"] = message.name or names.get(message.tool_call_id, "")
            rendered.append(entry)
        return rendered


    def openai_messages(self) -> list[dict[str, Any]]:
        """The messages as OpenAI's API takes them (arguments as JSON text): what an engine's server is sent."""
        messages = []
        for entry, message in zip(self.template_messages(), self.messages):
            for call, original in zip(entry.get("tool_calls", ()), message.tool_calls):
                call["function"]["arguments"] = original.arguments
            messages.append(entry)
        return messages


def parse_chat_request(request) -> ChatParams:
    """request: an mpsd.v1.ChatRequest. Raises InvalidRequest naming the field."""
    if not request.messages:
        raise InvalidRequest("messages: must not be empty")
    messages = _messages(request.messages)
    check_prompt_length("".join(m.content + "".join(c.arguments for c in m.tool_calls) for m in messages), "messages")
    tools = _tools(request.tools_json)
    tool_choice, forced = _tool_choice(request, tools)
    return ChatParams(
        messages=messages,
        tools=tools,
        sampling=sampling_params(request, prompt=""),
        tool_choice=tool_choice,
        forced_function=forced,
        parallel_tool_calls=request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True,
        response_schema=_response_schema(request),
    )


def _messages(messages) -> tuple[ChatMessage, ...]:
    parsed: list[ChatMessage] = []
    called: set[str] = set()  # ids of the tool calls made so far: what a "tool" message may answer
    for index, message in enumerate(messages):
        at = f"messages[{index}]"
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(f"{at}.role: must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest(f"{at}.tool_calls: only an assistant message carries tool calls")
        calls = tuple(_tool_call(call, f"{at}.tool_calls[{number}]") for number, call in enumerate(message.tool_calls))
        called.update(call.id for call in calls)
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequest(f"{at}.tool_call_id: required for a 'tool' message (the id of the call it answers)")
            if message.tool_call_id not in called:
                raise InvalidRequest(f"{at}.tool_call_id: no assistant message before it made a tool call with id "
                                     f"{message.tool_call_id!r}")
        parsed.append(ChatMessage(message.role, message.content, calls, message.tool_call_id, message.name))
    return tuple(parsed)


def _tool_call(call, at: str) -> ToolCall:
    if not call.id:
        raise InvalidRequest(f"{at}.id: required")
    if not call.name:
        raise InvalidRequest(f"{at}.name: required (the function's name)")
    try:
        arguments = json.loads(call.arguments or "{}")
    except ValueError as exc:
        raise InvalidRequest(f"{at}.arguments: not valid JSON ({exc})") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"{at}.arguments: must be a JSON object")
    return ToolCall(call.id, call.name, call.arguments or "{}")


def _tools(text: str) -> tuple[dict, ...] | None:
    if not text:
        return None
    try:
        tools = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"tools: not valid JSON ({exc})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise InvalidRequest("tools: must be a JSON array of objects")
    names: set[str] = set()
    for index, tool in enumerate(tools):
        names.add(_tool_name(tool, f"tools[{index}]", names))
    return tuple(tools) or None


def _tool_name(tool: dict, at: str, seen: set[str]) -> str:
    """A tool is {"type": "function", "function": {"name", "description"?, "parameters"?}}, as in OpenAI's API."""
    if tool.get("type") != "function":
        raise InvalidRequest(f"{at}.type: must be \"function\", got {json.dumps(tool.get('type'))}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise InvalidRequest(f"{at}.function: must be an object with the function's name and parameters")
    name = function.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME.match(name):
        raise InvalidRequest(f"{at}.function.name: must be 1 to 64 letters, digits, '_', '.' or '-', got {json.dumps(name)}")
    if name in seen:
        raise InvalidRequest(f"{at}.function.name: {name!r} is given twice")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequest(f"{at}.function.parameters: must be a JSON Schema object")
    return name


def _tool_choice(request, tools: tuple[dict, ...] | None) -> tuple[str, str]:
    which = request.tool_choice.WhichOneof("choice") if request.HasField("tool_choice") else None
    if which is None:
        return "auto", ""
    if which == "mode":
        mode = request.tool_choice.mode
        if mode not in TOOL_CHOICE_MODES:
            raise InvalidRequest(f"tool_choice: must be one of {', '.join(TOOL_CHOICE_MODES)} or a function, got {mode!r}")
        if mode == "required" and not tools:
            raise InvalidRequest("tool_choice: 'required' needs tools")
        return mode, ""
    name = request.tool_choice.function
    known = [tool["function"]["name"] for tool in tools or ()]
    if name not in known:
        raise InvalidRequest(f"tool_choice: no tool named {name!r} in tools (tools: {', '.join(known) or 'none'})")
    return "function", name


def _response_schema(request) -> str | None:
    if not request.HasField("response_format"):
        return None
    kind = request.response_format.type or "text"
    if kind not in RESPONSE_FORMATS:
        raise InvalidRequest(f"response_format.type: must be one of {', '.join(RESPONSE_FORMATS)}, got {kind!r}")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    if not request.response_format.json_schema:
        raise InvalidRequest("response_format.json_schema: required for type 'json_schema' (the schema, as JSON)")
    return parse_json_schema(request.response_format.json_schema, "response_format.json_schema")
