"""A model's own chat template: what it takes, and a conversation rendered with it into a prompt.

The template comes from the model's tokenizer (transformers' tokenizer, or
mlx-lm's TokenizerWrapper, which also knows templates given in code), read
once at load. A Chat is rendered with `add_generation_prompt=True` and
`tokenize=False`, and the text then goes through the decode loop exactly as
a Generate prompt does, so batching, stop sequences and limits hold alike.

Where rendering runs: on the thread that reads the daemon's Steps stream,
before the request is submitted. That needs no lock: with tokenize=False, apply_chat_template
renders a Jinja template that transformers compiled once (cached) in a
sandboxed environment, with a fresh context per call, reading only the
tokenizer's special-token strings; it never touches the Rust tokenizer, the
model or the device, which stay the decode thread's. And it keeps Jinja work
over a long conversation off the decode thread, where it would delay every
sequence in the batch. Control tokens written inside a message are encoded
as control tokens, as in mlx_lm.server (transformers' sanitizing needs
tokenize=True).

jinja2 is imported only where a template exists: such a worker has
transformers, which brings it; null-lm has no template.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

from mpsd.chat_params import ChatParams
from mpsd.generate_params import InvalidRequest, check_prompt_length
from mpsd.worker.agents.tool_syntax import SYNTAXES, ToolSyntax, syntax_of

# (messages, tools or None) -> the prompt text
Render = Callable[[list[dict[str, Any]], list[dict] | None], str]


class NoChatTemplate(Exception):
    """The model has no chat template: the worker answers FAILED_PRECONDITION."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    render: Render
    takes_tools: bool      # the template reads a `tools` variable
    takes_tool_role: bool  # the template handles messages of role "tool"
    tool_syntax: ToolSyntax | None = None  # how the model writes tool calls (agents/tool_syntax.py); None: unknown


def template_of(tokenizer: Any) -> ChatTemplate | None:
    """The tokenizer's chat template, or None when it has none."""
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, dict):  # transformers' named templates ("default", "tool_use", ...): any of them
        source = "\n".join(t for t in source.values() if isinstance(t, str))
    has_template = getattr(tokenizer, "has_chat_template", None)  # mlx-lm's wrapper: a template in code counts
    if not (source if has_template is None else has_template):
        return None
    if not isinstance(source, str) or not source:  # a renderer in code: nothing to read, so assume it takes both
        return ChatTemplate(_renderer(tokenizer), takes_tools=True, takes_tool_role=True)
    return ChatTemplate(_renderer(tokenizer), takes_tools=_reads_variable(source, "tools"),
                        takes_tool_role=bool(re.search(r"""["']tool["']""", source)), tool_syntax=syntax_of(source))


def render_prompt(template: ChatTemplate | None, model_name: str, chat: ChatParams) -> str:
    """The prompt the model's authors meant for this conversation; raises NoChatTemplate or InvalidRequest."""
    label = f"model {model_name!r}" if model_name else "this model"
    if template is None:
        raise NoChatTemplate(f"{label} has no chat template; use Generate")
    if chat.tools and not template.takes_tools:
        raise InvalidRequest(f"tools: the chat template of {label} does not take tools")
    if chat.calls_tools and template.tool_syntax is None:
        known = ", ".join(syntax.name for syntax in SYNTAXES)
        raise InvalidRequest(f"tools: mpsd cannot read the tool calls of {label}: its chat template uses none of the "
                             f"tool-call syntaxes it knows ({known}); send tool_choice \"none\" to get text")
    for index, message in enumerate(chat.messages):
        if message.role == "tool" and not template.takes_tool_role:
            raise InvalidRequest(f"messages[{index}].role: the chat template of {label} does not take 'tool' messages")
    prompt = template.render(chat.template_messages(), list(chat.tools) if chat.tools else None)
    if not prompt.strip():
        raise InvalidRequest(f"messages: the chat template of {label} rendered them as an empty prompt")
    check_prompt_length(prompt, "messages")
    return prompt


def _renderer(tokenizer: Any) -> Render:
    from jinja2 import TemplateError

    def render(messages: list[dict[str, Any]], tools: list[dict] | None) -> str:
        try:
            return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
        except TemplateError as exc:  # the template's raise_exception(), e.g. "roles must alternate user/assistant"
            raise InvalidRequest(f"messages: the model's chat template refused them: {exc}") from None
    return render


def _reads_variable(source: str, name: str) -> bool:
    """Whether the template reads `name`; a template using tags plain Jinja lacks is searched as text."""
    from jinja2 import Environment, TemplateSyntaxError, meta

    try:
        return name in meta.find_undeclared_variables(Environment().parse(source))
    except TemplateSyntaxError:
        return re.search(rf"\b{re.escape(name)}\b", source) is not None
