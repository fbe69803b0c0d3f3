"""The meaning of a ChatRequest: its messages, tools and sampling fields, shared by daemon and worker.

The daemon checks a Chat before it takes a worker slot, as it does a Generate
(generate_params.py); the worker reads the request again with the same
function, then renders the messages with the model's own chat template
(worker/backends/chat.py). What only the template can tell — whether it has
one, takes tools, or takes a "tool" message — is checked there.
"""

from __future__ import annotations

import dataclasses
import json
from typing import NamedTuple

from mpsd.generate_params import GenerateParams, InvalidRequest, check_prompt_length, sampling_params

CHAT_ROLES = ("system", "user", "assistant", "tool")  # "tool" only where the template takes it


class ChatMessage(NamedTuple):
    role: str
    content: str


@dataclasses.dataclass(frozen=True)
class ChatParams:
    messages: tuple[ChatMessage, ...]
    tools: tuple[dict, ...] | None  # tool definitions for the template's `tools`; None when there are none
    sampling: GenerateParams        # its prompt is "" until the worker renders the messages

    def template_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates read them."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def parse_chat_request(request) -> ChatParams:
    """request: an mpsd.v1.ChatRequest. Raises InvalidRequest naming the field."""
    if not request.messages:
        raise InvalidRequest("messages: must not be empty")
    for index, message in enumerate(request.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequest(f"messages[{index}].role: must be one of {', '.join(CHAT_ROLES)}, got {message.role!r}")
    check_prompt_length("".join(m.content for m in request.messages), "messages")
    return ChatParams(
        messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
        tools=_tools(request.tools_json),
        sampling=sampling_params(request, prompt=""),
    )


def _tools(text: str) -> tuple[dict, ...] | None:
    if not text:
        return None
    try:
        tools = json.loads(text)
    except ValueError as exc:
        raise InvalidRequest(f"tools: not valid JSON ({exc})") from None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise InvalidRequest("tools: must be a JSON array of objects")
    return tuple(tools) or None
