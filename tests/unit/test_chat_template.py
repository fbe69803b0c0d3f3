"""Chat without processes: the request checks daemon and worker share, and rendering with a model's own template."""

import json
import pathlib
import shutil

import pytest

from mpsd.chat_params import parse_chat_request
from mpsd.demo.chat_template import DEMO_CHAT_TEMPLATE, TEMPLATE_FILE, install_chat_template
from mpsd.generate_params import MAX_PROMPT_CHARS, InvalidRequest
from mpsd.v1 import inference_pb2
from mpsd.worker.backends.chat import NoChatTemplate, render_prompt, template_of


def chat_request(*messages: tuple[str, str], **fields) -> inference_pb2.ChatRequest:
    return inference_pb2.ChatRequest(
        model="m", messages=[inference_pb2.ChatMessage(role=r, content=c) for r, c in messages], **fields)


class Tokenizer:
    """What template_of reads of a transformers tokenizer: its template, and apply_chat_template rendering it."""

    eos_token = "</s>"

    def __init__(self, chat_template) -> None:
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, messages, *, tools, add_generation_prompt, tokenize):
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            from jinja2 import TemplateError
            raise TemplateError(message)

        self.calls.append((add_generation_prompt, tokenize))
        environment = ImmutableSandboxedEnvironment()
        environment.globals["raise_exception"] = raise_exception
        return environment.from_string(self.chat_template).render(
            messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token)


TOOL_TEMPLATE = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                 "{% for m in messages %}{% if m['role'] == 'tool' %}[tool] {% endif %}{{ m['content'] }}\n{% endfor %}")
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
STRICT_TEMPLATE = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                   "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}{{ m['content'] }}{% endfor %}")


def test_a_valid_chat_is_read_with_generates_defaults():
    chat = parse_chat_request(chat_request(("system", "Be brief."), ("user", "Hi"), max_tokens=9, seed=3))
    assert chat.template_messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.sampling.max_tokens == 9 and chat.sampling.seed == 3 and chat.sampling.temperature == 1.0
    assert chat.tools is None and chat.sampling.prompt == ""


@pytest.mark.parametrize("request_, sentence", [
    (chat_request(), "messages: must not be empty"),
    (chat_request(("user", "Hi"), ("robot", "beep")), "messages[1].role: must be one of system, user, assistant, tool, got 'robot'"),
    (chat_request(("User", "Hi")), "messages[0].role: must be one of"),
    (chat_request(("user", "x" * (MAX_PROMPT_CHARS + 1))), "messages: 1000001 characters is over the limit"),
    (chat_request(("user", "Hi"), tools_json="{"), "tools: not valid JSON"),
    (chat_request(("user", "Hi"), tools_json='{"a": 1}'), "tools: must be a JSON array of objects"),
    (chat_request(("user", "Hi"), top_p=2), "top_p: must be in (0, 1], got 2"),
    (chat_request(("user", "Hi"), max_tokens=0), "max_tokens: must be at least 1"),
])
def test_bad_chats_are_refused_naming_the_field(request_, sentence):
    with pytest.raises(InvalidRequest) as refused:
        parse_chat_request(request_)
    assert str(refused.value).startswith(sentence)


def test_the_demo_template_renders_each_turn_and_the_generation_prompt():
    tokenizer = Tokenizer(DEMO_CHAT_TEMPLATE)
    template = template_of(tokenizer)
    assert template.takes_tools and template.takes_tool_role and template.tool_syntax.name == "hermes"
    prompt = render_prompt(template, "demo", parse_chat_request(chat_request(("system", "Be brief."), ("user", "Hi"))))
    assert prompt == "system: Be brief.</s>user: Hi</s>assistant:"
    assert tokenizer.calls == [(True, False)]  # the generation prompt added, text not tokens


def test_a_model_without_a_template_is_refused_with_its_name():
    assert template_of(Tokenizer(None)) is None
    with pytest.raises(NoChatTemplate, match="model 'plain' has no chat template; use Generate"):
        render_prompt(None, "plain", parse_chat_request(chat_request(("user", "Hi"))))


def test_tools_and_tool_messages_need_a_template_that_takes_them():
    call = inference_pb2.ChatMessage(role="assistant", tool_calls=[inference_pb2.ToolCall(id="c1", name="time")])
    answer = inference_pb2.ChatMessage(role="tool", content="12:00", tool_call_id="c1")
    tools = '[{"type": "function", "function": {"name": "time"}}]'
    chat = parse_chat_request(inference_pb2.ChatRequest(messages=[inference_pb2.ChatMessage(role="user", content="Hi"),
                                                                  call, answer], tools_json=tools))
    plain = template_of(Tokenizer(PLAIN_TEMPLATE))
    with pytest.raises(InvalidRequest, match="^tools: the chat template of model 'plain' does not take tools"):
        render_prompt(plain, "plain", chat)
    without_tools = parse_chat_request(inference_pb2.ChatRequest(messages=chat_request(("user", "Hi")).messages[:] +
                                                                 [call, answer]))
    with pytest.raises(InvalidRequest, match=r"^messages\[2\]\.role: the chat template of model 'plain' does not take"):
        render_prompt(plain, "plain", without_tools)
    taking = template_of(Tokenizer(TOOL_TEMPLATE))
    assert taking.takes_tools and taking.takes_tool_role and taking.tool_syntax is None
    with pytest.raises(InvalidRequest, match="^tools: mpsd cannot read the tool calls of model 't'"):
        render_prompt(taking, "t", chat)
    text_only = parse_chat_request(inference_pb2.ChatRequest(messages=[inference_pb2.ChatMessage(role="user", content="Hi"),
                                                                       call, answer], tools_json=tools,
                                                             tool_choice=inference_pb2.ToolChoice(mode="none")))
    assert render_prompt(taking, "t", text_only) == (  # plain Jinja's tojson sorts keys
        'Tools: [{"function": {"name": "time"}, "type": "function"}]\nHi\n\n[tool] 12:00\n')


def test_a_template_that_raises_refuses_the_messages():
    template = template_of(Tokenizer(STRICT_TEMPLATE))
    with pytest.raises(InvalidRequest, match="^messages: the model's chat template refused them: roles must alternate"):
        render_prompt(template, "s", parse_chat_request(chat_request(("user", "a"), ("user", "b"))))


def test_named_templates_and_templates_in_code_are_read_too():
    named = Tokenizer({"default": DEMO_CHAT_TEMPLATE, "tool_use": TOOL_TEMPLATE})
    assert template_of(named).takes_tools
    in_code = Tokenizer(None)
    in_code.has_chat_template = True  # mlx-lm's wrapper for a model whose template is Python code
    assert template_of(in_code).takes_tools and template_of(in_code).takes_tool_role
    declined = Tokenizer(DEMO_CHAT_TEMPLATE)
    declined.has_chat_template = False
    assert template_of(declined) is None


def test_the_demo_template_is_installed_once_and_atomically(tmp_path: pathlib.Path):
    assert install_chat_template(tmp_path) and not install_chat_template(tmp_path)
    target = tmp_path / TEMPLATE_FILE
    assert target.read_text() == DEMO_CHAT_TEMPLATE and oct(target.stat().st_mode & 0o777) == "0o644"
    target.write_text("an older template")
    assert install_chat_template(tmp_path) and target.read_text() == DEMO_CHAT_TEMPLATE
    assert sorted(p.name for p in tmp_path.iterdir()) == [TEMPLATE_FILE]  # no temporary file left


def test_transformers_reads_the_installed_template(demo_model, tmp_path: pathlib.Path):
    """The demo's own tokenizer, through the worker's code: the file mpsd writes is the one transformers loads."""
    transformers = pytest.importorskip("transformers")
    copy = tmp_path / "demo"
    shutil.copytree(demo_model, copy, ignore=shutil.ignore_patterns(TEMPLATE_FILE))
    assert template_of(transformers.AutoTokenizer.from_pretrained(copy)) is None
    install_chat_template(copy)
    template = template_of(transformers.AutoTokenizer.from_pretrained(copy))
    chat = parse_chat_request(chat_request(("user", "Hi")))
    assert render_prompt(template, "demo", chat) == "user: Hi<|endoftext|>assistant:"
    assert "chat_template" not in json.loads((copy / "tokenizer_config.json").read_text())
