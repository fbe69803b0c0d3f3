"""The OpenAI-compatible API's requests and answers, as pure functions: JSON in, mpsd requests out, and back.

A request body becomes the same ChatRequest or GenerateRequest a gRPC client
sends, so every check and default after this is mpsd's own. As OpenAI's API
does, fields it does not know are ignored; fields that would change the result
in a way mpsd cannot honour (several choices, log probabilities, penalties,
logit bias) are refused with a 400 naming the field, rather than answered as if
they had been applied. Tools, tool_choice, parallel_tool_calls and
response_format map onto ChatRequest's typed fields; tool calls come back as
`message.tool_calls`, or streamed as `delta.tool_calls` pieces.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
from typing import Any

import grpc

from mpsd.v1 import inference_pb2

INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
PARAM = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")  # mpsd's sentences start with the field at fault
# HTTP status, OpenAI error type and code for each gRPC status mpsd answers with; the SDKs pick their exception
# class from the status (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 5xx).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout", None),
}
SERVER_ERROR = (500, "server_error", None)
# Fields refused unless they hold the value that changes nothing.
NEUTRAL = {"n": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
           "top_logprobs": (None,)}
CHAT_NEUTRAL = {**NEUTRAL, "logprobs": (None, False)}
TEXT_NEUTRAL = {**NEUTRAL, "logprobs": (None,), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
                "response_format": (None, {"type": "text"})}


class BadField(ValueError):
    """A request field mpsd cannot take; answered 400 with `param` set to the field."""

    def __init__(self, param: str | None, problem: str) -> None:
        super().__init__(f"{param}: {problem}" if param else problem)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Completion:
    """One parsed request: what to send through the router, and how the answer is wanted."""

    method: str            # "Chat" or "Generate"
    request: Any           # an mpsd.v1.ChatRequest or GenerateRequest
    stream: bool
    include_usage: bool    # stream_options.include_usage: a last chunk with the usage


def decode_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadField(None, f"body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise BadField(None, "body: must be a JSON object")
    _refuse_lone_surrogates(body, "")
    return body


def _refuse_lone_surrogates(value: Any, at: str) -> None:
    """JSON's \\ud800 escapes decode to strings no UTF-8 protobuf field can hold: refused here, naming the field,
    rather than failing later as a server error."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadField(at or None, "not valid text: a lone UTF-16 surrogate escape (\\ud800-\\udfff)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_lone_surrogates(key, at or "body")
            _refuse_lone_surrogates(item, f"{at}.{key}" if at else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{at}[{index}]")


def parse_chat(body: dict[str, Any]) -> Completion:
    """The shapes are checked here; what they mean (a named tool that exists, a tool message answering a call made
    before it, a schema's JSON) is chat_params' to check, as for a gRPC client."""
    _refuse_changes(body, CHAT_NEUTRAL)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise BadField("tools", "must be a list of tool definitions")
    request = inference_pb2.ChatRequest(messages=_messages(body.get("messages")), tools_json=json.dumps(tools) if tools else "")
    _tool_choice(body.get("tool_choice"), request.tool_choice)
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadField("parallel_tool_calls", f"must be true or false, got {json.dumps(parallel)}")
    if parallel is not None:
        request.parallel_tool_calls = parallel
    _response_format(body.get("response_format"), request)
    return _completion("Chat", request, body)


def _tool_choice(value: Any, choice: inference_pb2.ToolChoice) -> None:
    """"auto", "none", "required", or {"type": "function", "function": {"name": ...}}."""
    if value is None:
        return
    if isinstance(value, str):
        choice.mode = value
        return
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or value.get("type", "function") != "function":
        raise BadField("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "function": '
                                      '{"name": ...}}')
    choice.function = name


def _response_format(value: Any, request: inference_pb2.ChatRequest) -> None:
    """{"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}."""
    if value is None:
        return
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise BadField("response_format", 'must be an object like {"type": "json_object"}')
    request.response_format.type = value["type"]
    if value["type"] != "json_schema":
        return
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise BadField("response_format.json_schema", "required: an object with the schema's name and schema")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise BadField("response_format.json_schema.schema", "required: a JSON Schema object")
    name = spec.get("name", "")
    if not isinstance(name, str):
        raise BadField("response_format.json_schema.name", f"must be a string, got {json.dumps(name)}")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise BadField("response_format.json_schema.strict", f"must be true or false, got {json.dumps(strict)}")
    request.response_format.json_schema = json.dumps(schema)
    request.response_format.name = name
    request.response_format.strict = bool(strict)


def parse_completion(body: dict[str, Any]) -> Completion:
    _refuse_changes(body, TEXT_NEUTRAL)
    return _completion("Generate", inference_pb2.GenerateRequest(prompt=_prompt(body.get("prompt"))), body)


def _completion(method: str, request, body: dict[str, Any]) -> Completion:
    request.model = _string(body, "model") or ""
    max_tokens = _integer(body, "max_completion_tokens", 1, INT32_MAX)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, INT32_MAX)
    for field, value in (("max_tokens", max_tokens), ("temperature", _number(body, "temperature")),
                         ("top_p", _number(body, "top_p")), ("seed", _integer(body, "seed", 0, UINT64_MAX))):
        if value is not None:
            setattr(request, field, value)
    request.stop.extend(_stop(body.get("stop")))
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise BadField("stream", f"must be true or false, got {json.dumps(stream)}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or options.get("include_usage") not in (None, True, False):
        raise BadField("stream_options", "must be an object like {\"include_usage\": true}")
    return Completion(method, request, bool(stream), bool(options.get("include_usage")))


def _refuse_changes(body: dict[str, Any], neutral: dict[str, tuple]) -> None:
    for field, harmless in neutral.items():
        if field in body and body[field] not in harmless:
            raise BadField(field, f"mpsd does not support {json.dumps(body[field])} here (it would change the "
                                  f"answer); leave it out")


def _messages(value: Any) -> list[inference_pb2.ChatMessage]:
    if value is None:
        raise BadField("messages", "required")
    if not isinstance(value, list):
        raise BadField("messages", "must be a list of messages")
    messages = []
    for index, message in enumerate(value):
        at = f"messages[{index}]"
        if not isinstance(message, dict):
            raise BadField(at, "must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadField(f"{at}.role", f"must be a string, got {json.dumps(role)}")
        content = _content(message.get("content"), f"{at}.content")
        entry = inference_pb2.ChatMessage(role="system" if role == "developer" else role, content=content,
                                          tool_calls=_tool_calls(message.get("tool_calls"), f"{at}.tool_calls"))
        for field in ("tool_call_id", "name"):
            if (text := _string(message, field, at)) is not None:
                setattr(entry, field, text)
        messages.append(entry)
    return messages


def _tool_calls(value: Any, at: str) -> list[inference_pb2.ToolCall]:
    """An assistant's calls as OpenAI writes them: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadField(at, "must be a list of tool calls")
    calls = []
    for index, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise BadField(f"{at}[{index}]", 'must be {"id": ..., "type": "function", "function": {"name": ..., '
                                             '"arguments": ...}}')
        arguments = function.get("arguments", "{}")
        if isinstance(arguments, dict):  # some clients send the object itself
            arguments = json.dumps(arguments)
        if not isinstance(arguments, str):
            raise BadField(f"{at}[{index}].function.arguments", "must be a JSON object as a string")
        calls.append(inference_pb2.ToolCall(id=_string(call, "id", f"{at}[{index}]") or "",
                                            name=_string(function, "name", f"{at}[{index}].function") or "",
                                            arguments=arguments))
    return calls


def _content(value: Any, at: str) -> str:
    """A string, or text parts ([{"type": "text", "text": ...}]) joined by newlines; null is empty."""
    if value is None or isinstance(value, str):
        return value or ""
    if not isinstance(value, list):
        raise BadField(at, "must be a string or a list of text parts")
    texts = []
    for index, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadField(f"{at}[{index}]", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
        texts.append(part["text"])
    return "\n".join(texts)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        return value
    if value is None:
        raise BadField("prompt", "required")
    raise BadField("prompt", "must be one string (mpsd takes one prompt per request, as text, not token ids)")


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise BadField("stop", "must be a string or a list of strings")


def _string(body: dict[str, Any], key: str, at: str = "") -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadField(f"{at}.{key}" if at else key, f"must be a string, got {json.dumps(value)}")
    return value


def _integer(body: dict[str, Any], key: str, minimum: int, maximum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadField(key, f"must be an integer, got {json.dumps(value)}")
    if not minimum <= value <= maximum:
        raise BadField(key, f"must be from {minimum} to {maximum}, got {value}")
    return value


def _number(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise BadField(key, f"must be a number, got {json.dumps(value)}")
    return value


# -- answers ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answer:
    """What every piece of one answer repeats: its id, when it was made, the model, and its kind."""

    chat: bool
    model: str
    created: int
    id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(12))

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": ("chatcmpl-" if self.chat else "cmpl-") + self.id, "object": kind, "created": self.created,
                "model": self.model}

    def whole(self, text: str, finish: inference_pb2.Finish) -> dict[str, Any]:
        """The non-streamed answer; with tool calls, `content` is null unless the model also wrote text."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if finish.tool_calls:
                message["content"] = text or None
                message["tool_calls"] = [_tool_call(call) for call in finish.tool_calls]
            piece: dict[str, Any] = {"message": message}
        else:
            piece = {"text": text}
        choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish.reason, **_incomplete(finish)}
        return {**self._head(chunk=False), "choices": [choice], "usage": usage(finish)}

    def chunk(self, text: str = "", finish_reason: str | None = None, first: bool = False,
              tool_call: inference_pb2.ToolCallDelta | None = None,
              finish: inference_pb2.Finish | None = None) -> dict[str, Any]:
        """A streamed piece; a chat stream's first delta carries the role, as OpenAI's does."""
        if self.chat:
            if tool_call is not None:
                delta: dict[str, Any] = {"tool_calls": [_tool_call_delta(tool_call)]}
            else:
                delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            piece: dict[str, Any] = {"delta": delta}
        else:
            piece = {"text": text}
        choice = {"index": 0, **piece, "logprobs": None, "finish_reason": finish_reason,
                  **(_incomplete(finish) if finish is not None else {})}
        return {**self._head(chunk=True), "choices": [choice]}

    def usage_chunk(self, finish: inference_pb2.Finish) -> dict[str, Any]:
        return {**self._head(chunk=True), "choices": [], "usage": usage(finish)}


def _tool_call(call: inference_pb2.ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _tool_call_delta(delta: inference_pb2.ToolCallDelta) -> dict[str, Any]:
    """A call's first piece has its id, type and name (arguments ""); the next ones only add to its arguments."""
    if delta.name:
        return {"index": delta.index, "id": delta.id, "type": "function",
                "function": {"name": delta.name, "arguments": delta.arguments}}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


def _incomplete(finish: inference_pb2.Finish) -> dict[str, Any]:
    """Why an answer is incomplete (max_tokens inside constrained output or a tool call), where it is."""
    return {"incomplete_details": {"reason": finish.reason, "message": finish.detail}} if finish.detail else {}


def usage(finish: inference_pb2.Finish) -> dict[str, Any]:
    """OpenAI's usage; prompt_tokens_details.cached_tokens: prompt tokens the worker's prefix cache served."""
    prompt, completion = finish.usage.prompt_tokens, finish.usage.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": finish.usage.cached_tokens}}


def models_list(names: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_entry(name, created) for name in names]}


def model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "mpsd"}


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          code: str | None = None) -> dict[str, Any]:
    """OpenAI's error body. `status` only picks the type when none is given for a 5xx."""
    if status >= 500 and kind == "invalid_request_error":
        kind = "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_for(code: grpc.StatusCode, details: str) -> tuple[int, dict[str, Any]]:
    """The HTTP status and body for an mpsd refusal, with the field its sentence names as the param."""
    status, kind, error_code = HTTP_STATUS.get(code, SERVER_ERROR)
    named = PARAM.match(details)
    return status, error(status, details, named.group(1) if named else None, kind, error_code)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + to_json(event) + b"\n\n"


def to_json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


SSE_DONE = b"data: [DONE]\n\n"
