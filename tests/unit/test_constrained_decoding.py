"""Constrained decoding in the decode loop, in-process on the real demo models: grammar-masked rows beside free rows
in one batch, what the grammars are made of, and how a grammar the engine refuses is reported."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from mpsd.chat_params import parse_chat_request  # noqa: E402
from mpsd.generate_params import Constraint, InvalidRequest  # noqa: E402
from mpsd.v1 import inference_pb2  # noqa: E402
from mpsd.worker.agents.grammar import chat_constraint  # noqa: E402
from mpsd.worker.agents.matcher import GrammarCompiler  # noqa: E402
from mpsd.worker.agents.tool_syntax import HERMES, LLAMA3_JSON, MISTRAL  # noqa: E402
from mpsd.worker.backends.torch_lm import TorchCausalLM  # noqa: E402

from decoding import params, run, running, started, token_ids  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 50}},
          "required": ["name", "ok", "n"], "additionalProperties": False}
PROMPTS = ["Hello", "The module provides", "def main():", "A class that"]


@pytest.fixture(scope="module")
def demo(demo_model):
    return TorchCausalLM(str(demo_model), "cpu")


@pytest.fixture(scope="module")
def compiler(demo):
    return GrammarCompiler(demo.grammar_tokenizer(), demo.logits_width)


def constrained(prompt: str, seed: int):
    return dataclasses.replace(params(prompt, 80, temperature=1.0, seed=seed),
                               constraint=Constraint("json_schema", json.dumps(SCHEMA), "json_schema"))


def text_of(events) -> str:
    return "".join(e.text for e in events)


def test_constrained_and_free_rows_share_steps_and_neither_changes_the_other(demo, compiler):
    free = [params(p, 40) for p in PROMPTS]
    masked = [constrained(p, seed) for seed, p in enumerate(PROMPTS)]
    with running(demo) as scheduler:
        alone = [token_ids(run(scheduler, request)[0]) for request in free]
        clients = [scheduler_client(scheduler, request, compiler) for request in masked] + started(scheduler, free)
        for client in clients:
            client.finish()
        assert max(step.decode_rows for step in scheduler.steps) >= 6, "constrained and free rows shared steps"
    assert [token_ids(c.events) for c in clients[len(masked):]] == alone  # free rows as if alone
    for client in clients[:len(masked)]:
        *tokens, finished = client.events
        assert finished.reason == "stop" and not finished.detail
        jsonschema.validate(json.loads(text_of(tokens)), SCHEMA)


def scheduler_client(scheduler, request, compiler) -> "GrammarClient":
    client = GrammarClient(scheduler, request, compiler.row(request.constraint))
    client.start()
    return client


class GrammarClient:
    """A constrained request read on its own thread, as the worker's Steps stream would."""

    def __init__(self, scheduler, request, grammar) -> None:
        import threading

        self.submission = scheduler.submit(request, grammar=grammar)
        self.events: list = []
        self._thread = threading.Thread(target=lambda: self.events.extend(self.submission), daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self):
        self._thread.join(120)
        assert not self._thread.is_alive(), "a stream hung"
        return self


def test_running_out_of_tokens_inside_the_grammar_is_length_with_a_detail(demo, compiler):
    request = dataclasses.replace(params("Hello", 5), constraint=Constraint(
        "json_schema", json.dumps({"type": "object", "properties": {"t": {"type": "string", "minLength": 50}}}),
        "json_schema"))
    with running(demo) as scheduler:
        events = list(scheduler.submit(request, grammar=compiler.row(request.constraint)))
    assert events[-1].reason == "length" and "incomplete" in events[-1].detail


def test_a_grammar_is_compiled_once_and_copied_per_request(compiler):
    constraint = Constraint("json_schema", json.dumps({"type": "object", "properties": {"z": {"type": "null"}}}),
                            "json_schema")
    before = compiler.compiled
    first, second = compiler.row(constraint), compiler.row(constraint)
    assert compiler.compiled == before + 1 and first is not second
    first.consume(int(first.allowed().nonzero()[0][0]))
    assert first.consumed == 1 and second.consumed == 0


@pytest.mark.parametrize("constraint, sentence", [
    (Constraint("json_schema", '{"type": "foo"}', "json_schema"),
     "json_schema: the grammar engine (llguidance) cannot enforce this schema: Invalid type: foo"),
    (Constraint("json_schema", '{"if": {}, "then": {}}', "response_format.json_schema"),
     'response_format.json_schema: the grammar engine (llguidance) cannot enforce this schema: Unimplemented keys: '
     '["if", "then"]'),
    (Constraint("lark", "start: missing", "grammar"), "grammar: at 1(8): unknown name"),
])
def test_a_grammar_the_engine_refuses_names_the_field_and_the_reason(compiler, constraint, sentence):
    with pytest.raises(InvalidRequest) as refused:
        compiler.row(constraint)
    assert str(refused.value).startswith(sentence), str(refused.value)


TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object", "properties": {
    "x": {"enum": [1, 2]}}, "required": ["x"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "b"}}]


def chat(tool_choice: inference_pb2.ToolChoice | None = None, parallel: bool | None = None, schema=None):
    request = inference_pb2.ChatRequest(messages=[inference_pb2.ChatMessage(role="user", content="hi")],
                                        tools_json=json.dumps(TOOLS))
    if tool_choice is not None:
        request.tool_choice.CopyFrom(tool_choice)
    if parallel is not None:
        request.parallel_tool_calls = parallel
    if schema is not None:
        request.response_format.type = "json_schema"
        request.response_format.json_schema = json.dumps(schema)
    return parse_chat_request(request)


def sentences(compiler, constraint, texts: list[str]) -> list[bool]:
    """Which texts the grammar accepts whole, fed as the tokenizer splits them."""
    results = []
    for text in texts:
        row = compiler.row(constraint)
        ok = True
        for token in compiler._hf.encode(text, add_special_tokens=False):
            if not row.allowed()[token]:
                ok = False
                break
            row.consume(token)
        results.append(ok and row.accepting)
    return results


def test_required_allows_several_calls_only_when_parallel_and_a_named_function_exactly_one(compiler):
    one_a = '<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>'
    one_b = '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>'
    required = chat_constraint(chat(inference_pb2.ToolChoice(mode="required")), HERMES)
    assert sentences(compiler, required, [one_a, one_a + "\n" + one_b, "hello", '<tool_call>\n{"name": "c"']) == \
        [True, True, False, False]
    single = chat_constraint(chat(inference_pb2.ToolChoice(mode="required"), parallel=False), HERMES)
    assert sentences(compiler, single, [one_a, one_a + "\n" + one_b]) == [True, False]
    named = chat_constraint(chat(inference_pb2.ToolChoice(function="b")), HERMES)
    assert sentences(compiler, named, [one_b, one_a]) == [True, False]
    assert chat_constraint(chat(), HERMES) is None  # auto without a response format: free


def test_auto_with_a_response_format_is_the_answer_or_a_call(compiler):
    either = chat_constraint(chat(schema={"type": "object", "properties": {"r": {"type": "boolean"}}}), HERMES)
    assert sentences(compiler, either, ['{"r": true}', '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
                                        "free text"]) == [True, True, False]


def test_mistral_and_llama3_calls_have_their_own_framing(compiler):
    mistral = chat_constraint(chat(inference_pb2.ToolChoice(mode="required")), MISTRAL)
    assert sentences(compiler, mistral, ['[TOOL_CALLS][{"name": "a", "arguments": {"x": 2}}, {"name": "b", '
                                         '"arguments": {}}]', '{"name": "b", "arguments": {}}']) == [True, False]
    llama = chat_constraint(chat(inference_pb2.ToolChoice(function="a")), LLAMA3_JSON)
    assert sentences(compiler, llama, ['{"name": "a", "parameters": {"x": 1}}',
                                       '{"name": "a", "arguments": {"x": 1}}']) == [True, False]
