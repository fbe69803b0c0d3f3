"""Tool calls read from a reply as it streams, in each syntax mpsd knows, without processes or a tokenizer."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpsd.worker.agents.reply_parser import CallArguments, CallStart, Content, ReplyParser
from mpsd.worker.agents.tool_syntax import HERMES, LLAMA3_JSON, MISTRAL, syntax_of

HERMES_REPLY = ('Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": [1, {"x": "}"}]}}'
                '\n</tool_call>\n<tool_call>\n{"arguments": {"zone": "utc"}, "name": "clock"}\n</tool_call>')
MISTRAL_REPLY = '[TOOL_CALLS] [{"name": "a", "arguments": {"q": "\\"]"}}, {"name": "b", "arguments": {}}]'
LLAMA3_REPLY = ' {"name": "search", "parameters": {"query": "mpsd"}}'


def read(syntax, text: str, sizes: list[int] | None = None):
    """Feeds `text` in pieces of the given sizes (1 by default); returns content, calls, streamed pieces, detail."""
    parser, pieces, at, sizes = ReplyParser(syntax), [], 0, list(sizes or [])
    while at < len(text):
        size = sizes.pop(0) if sizes else 1
        pieces += parser.feed(text[at:at + size])
        at += size
    rest, detail = parser.finish()
    pieces += rest
    content = "".join(p.text for p in pieces if isinstance(p, Content))
    return content, [(c.name, c.arguments) for c in parser.calls], pieces, detail


@pytest.mark.parametrize("source, name", [
    ("{% for m in messages %}<tool_call>{{ m.tool_calls | tojson }}</tool_call>{% endfor %}", "hermes"),
    ("{{ '[TOOL_CALLS] ' + (m.tool_calls | tojson) }}", "mistral"),
    ("{%- if builtin_tools is defined %}<|python_tag|>{% endif %}", "llama3_json"),
    ("{{ 'ipython' }} {\"name\": ..., \"parameters\": ...}", "llama3_json"),
])
def test_the_syntax_is_recognised_from_the_template(source, name):
    assert syntax_of(source).name == name


def test_a_template_without_known_markers_has_no_syntax():
    assert syntax_of("{% for m in messages %}{{ m.content }}{% endfor %}") is None


@pytest.mark.parametrize("syntax, reply, content, calls", [
    (HERMES, HERMES_REPLY, "Let me look. ",
     [("get_weather", '{"city": "Paris", "days": [1, {"x": "}"}]}'), ("clock", '{"zone": "utc"}')]),
    (MISTRAL, MISTRAL_REPLY, "", [("a", '{"q": "\\"]"}'), ("b", "{}")]),
    (LLAMA3_JSON, LLAMA3_REPLY, "", [("search", '{"query": "mpsd"}')]),
    (LLAMA3_JSON, '<|python_tag|>{"name": "s", "parameters": {}}', "", [("s", "{}")]),
])
def test_calls_and_content_are_read_whole_or_a_character_at_a_time(syntax, reply, content, calls):
    for sizes in (None, [len(reply)], [3] * len(reply)):
        got_content, got_calls, _, detail = read(syntax, reply, sizes)
        assert (got_content, got_calls, detail) == (content, calls, "")


def test_a_call_streams_its_name_first_then_arguments_that_join_to_the_whole():
    _, calls, pieces, _ = read(HERMES, HERMES_REPLY)
    first = [p for p in pieces if not isinstance(p, Content) and p.index == 0]
    assert isinstance(first[0], CallStart) and first[0].name == "get_weather"
    assert all(isinstance(p, CallArguments) for p in first[1:]) and len(first) > 5  # in pieces, as generated
    assert "".join(p.text for p in first[1:]) == calls[0][1]
    ids = [p.id for p in pieces if isinstance(p, CallStart)]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


def test_mistral_ids_are_nine_letters_and_digits():
    _, _, pieces, _ = read(MISTRAL, MISTRAL_REPLY)
    assert all(len(p.id) == 9 and p.id.isalnum() for p in pieces if isinstance(p, CallStart))


@pytest.mark.parametrize("syntax, reply", [
    (HERMES, "Use <tool_call> like this: <tool_call> is a tag."),
    (HERMES, "a <tool_call> nope {"),
    (MISTRAL, "[TOOL_CALLS] nothing"),
    (LLAMA3_JSON, '{"answer": 42} as JSON'),
    (LLAMA3_JSON, 'The call {"name": "s", "parameters": {}} comes later'),  # not at the start: text
])
def test_text_that_is_no_call_is_given_back_as_content(syntax, reply):
    content, calls, _, detail = read(syntax, reply)
    assert (content, calls, detail) == (reply, [], "")


def test_a_reply_cut_inside_a_call_says_so():
    content, calls, _, detail = read(HERMES, '<tool_call>\n{"name": "g", "arguments": {"q": "ab')
    assert calls == [("g", '{"q": "ab')] and content == ""
    assert detail == "the reply ended inside tool call 0: its arguments are incomplete"


def test_a_marker_split_across_tokens_never_leaks_into_content():
    _, _, pieces, _ = read(HERMES, HERMES_REPLY, [1] * len(HERMES_REPLY))
    assert not any("<" in p.text for p in pieces if isinstance(p, Content))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), max_size=80),
       st.sampled_from([(HERMES, HERMES_REPLY), (MISTRAL, MISTRAL_REPLY), (LLAMA3_JSON, LLAMA3_REPLY)]))
def test_however_the_text_is_split_the_reply_reads_the_same(sizes, case):
    syntax, reply = case
    assert read(syntax, reply, sizes)[:2] == read(syntax, reply, [len(reply)])[:2]
    _, calls, pieces, _ = read(syntax, reply, sizes)
    for index, (_, arguments) in enumerate(calls):
        assert "".join(p.text for p in pieces if isinstance(p, CallArguments) and p.index == index) == arguments
        json.loads(arguments)
