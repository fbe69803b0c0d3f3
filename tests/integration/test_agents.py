"""Agents through a real daemon: tool calls as data and constrained output, by the official `openai` SDK, gRPC and
LangChain, on a torch-lm and an mlx-lm worker.

One daemon for the module: the torch demo model and the MLX demo model, one worker each. Both serve the demo chat
template, which writes tool calls in the Hermes form (`<tool_call>` JSON `</tool_call>`). Neither model was trained to
call tools or write JSON: whatever they write parses and validates only because the grammar masks every token.
Strings carry a maxLength and numbers a range so that a model that never meant to write JSON still finishes it.
"""

import json

import grpc
import jsonschema
import openai
import pytest

from mpsd.v1 import inference_pb2
from support import DEMO_ONE_WORKER, running_daemon

MODELS = ["demo", "mlx"]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}}, "required": ["zone"],
         "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "clock", "parameters": CLOCK}}]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ANSWER = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12},
                                           "sure": {"type": "boolean"},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["answer", "sure", "score"], "additionalProperties": False}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def daemon(demo_model, mlx_demo_model, tmp_path_factory):
    config = DEMO_ONE_WORKER + """
[[models]]
name = "mlx"
backend = "mlx-lm"
path = "@mlx-demo"
replicas = 1
memory_limit = "2GiB"
"""
    with running_daemon(tmp_path_factory.mktemp("agents"), config, 2) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=daemon.http_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


def chat(client, model, stream=False, **fields):
    fields.setdefault("messages", USER)
    fields.setdefault("seed", 7)
    fields.setdefault("max_tokens", 120)
    return client.chat.completions.create(model=model, stream=stream, **fields)


def assemble(stream) -> tuple[dict, str | None, list[str]]:
    """A streamed chat put together as OpenAI's clients do: content joined, tool calls by index."""
    content, calls, finish, contents = "", {}, None, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        if delta.content:
            content += delta.content
            contents.append(delta.content)
        for piece in delta.tool_calls or ():
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
        finish = choice.finish_reason or finish
    return {"content": content or None, "tool_calls": [calls[i] for i in sorted(calls)]}, finish, contents


def as_dict(message) -> dict:
    return {"content": message.content,
            "tool_calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
                           for c in message.tool_calls or ()]}


def valid_call(call) -> dict:
    arguments = json.loads(call["arguments"])
    jsonschema.validate(arguments, PARAMETERS[call["name"]])
    return arguments


@pytest.mark.parametrize("model", MODELS)
def test_required_tool_choice_gives_calls_whose_arguments_validate(client, model):
    reply = chat(client, model, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = as_dict(choice.message)["tool_calls"]
    assert call["name"] in PARAMETERS and call["id"].startswith("call_")
    valid_call(call)


@pytest.mark.parametrize("model", MODELS)
def test_a_named_tool_is_the_one_called_and_streamed_equals_whole(client, model):
    fields = {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "clock"}}, "temperature": 0}
    whole = as_dict(chat(client, model, **fields).choices[0].message)
    streamed, finish, contents = assemble(chat(client, model, stream=True, **fields))
    assert finish == "tool_calls" and [c["name"] for c in whole["tool_calls"]] == ["clock"]
    assert valid_call(whole["tool_calls"][0]) == valid_call(streamed["tool_calls"][0])
    for call in whole["tool_calls"] + streamed["tool_calls"]:
        call.pop("id")
    assert streamed == whole
    assert not any("<tool_call>" in piece or "</tool_call>" in piece for piece in contents)  # no syntax leaked


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_replies_validate_and_stream_the_same(client, model):
    response_format = {"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER, "strict": True}}
    whole = chat(client, model, response_format=response_format, temperature=0).choices[0]
    assert whole.finish_reason == "stop"
    jsonschema.validate(json.loads(whole.message.content), ANSWER)
    streamed, finish, _ = assemble(chat(client, model, stream=True, response_format=response_format, temperature=0))
    assert streamed["content"] == whole.message.content and finish == "stop"


def test_json_object_replies_are_one_object(client):
    for seed in (1, 2):
        reply = chat(client, "demo", response_format={"type": "json_object"}, seed=seed, max_tokens=400,
                     messages=[{"role": "user", "content": "Reply in JSON."}])
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content), dict)
        else:  # cut by max_tokens: said so, never passed off as whole
            assert reply.choices[0].finish_reason == "length"
            assert "incomplete" in reply.choices[0].model_extra["incomplete_details"]["message"]


@pytest.mark.parametrize("model", MODELS)
def test_an_agent_loop_calls_a_tool_then_answers_from_its_result(client, model):
    messages = list(USER)
    first = chat(client, model, messages=messages, tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}}).choices[0]
    (call,) = first.message.tool_calls
    arguments = valid_call({"name": call.function.name, "arguments": call.function.arguments})
    messages += [first.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": f"Sunny in {arguments['city']}, 21 degrees"}]
    second = chat(client, model, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=12)
    assert second.choices[0].message.tool_calls is None and second.choices[0].message.content
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage.prompt_tokens > first_usage_prompt(client, model)


def first_usage_prompt(client, model) -> int:
    """The first turn's prompt (user message and tools) is shorter than the second's, which renders the call and
    the tool's result with the template."""
    return chat(client, model, tools=TOOLS, tool_choice="none", max_tokens=1).usage.prompt_tokens


def test_max_tokens_inside_a_constrained_object_is_length_and_says_so(client):
    long_string = {"type": "object", "properties": {"text": {"type": "string", "minLength": 200}}, "required": ["text"]}
    reply = chat(client, "demo", max_tokens=8,
                 response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": long_string}})
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.model_extra["incomplete_details"]["message"].startswith("max_tokens ran out inside the constrained")
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema", "Invalid type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"if": {}, "then": {}}}}},
     "response_format.json_schema", "Unimplemented keys"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice",
     "no tool named 'fly' in tools"),
    ({"tool_choice": "required"}, "tool_choice", "'required' needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "must be"),
    ({"messages": USER + [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages[1].tool_call_id",
     "no assistant message before it made a tool call with id 'nope'"),
])
def test_bad_agent_requests_are_400_naming_the_field(client, fields, param, words):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, "demo", **fields)
    error = refused.value.body
    assert error["param"] == param and words in error["message"], error


def test_grpc_generate_takes_a_json_schema_and_a_lark_grammar(daemon):
    inference = daemon.inference()
    request = inference_pb2.GenerateRequest(model="demo", prompt="The module", max_tokens=80, seed=3,
                                            json_schema=json.dumps(ANSWER))
    messages = list(inference.Generate(request, timeout=60))
    assert messages[-1].finish.reason == "stop"
    jsonschema.validate(json.loads("".join(m.text for m in messages[:-1])), ANSWER)
    grammar = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,3}/'
    for seed in range(3):
        text = "".join(m.text for m in inference.Generate(inference_pb2.GenerateRequest(
            model="demo", prompt="Is it?", max_tokens=10, seed=seed, grammar=grammar), timeout=60))
        assert text in ("yes", "no") or (text.startswith("maybe ") and text[6:].isdigit()), text
    with pytest.raises(grpc.RpcError) as refused:
        list(inference.Generate(inference_pb2.GenerateRequest(model="demo", prompt="x", grammar="start: nope"),
                                timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and refused.value.details().startswith("grammar: ")


def test_grpc_chat_carries_tool_calls_as_typed_fields(daemon):
    request = inference_pb2.ChatRequest(
        model="mlx", messages=[inference_pb2.ChatMessage(role="user", content="Time?")], tools_json=json.dumps(TOOLS),
        tool_choice=inference_pb2.ToolChoice(function="clock"), max_tokens=80, seed=1)
    messages = list(daemon.inference().Chat(request, timeout=60))
    finish = messages[-1].finish
    assert finish.reason == "tool_calls" and [c.name for c in finish.tool_calls] == ["clock"]
    deltas = [m.tool_call for m in messages[:-1] if m.HasField("tool_call")]
    assert deltas[0].id == finish.tool_calls[0].id and deltas[0].name == "clock"
    assert "".join(d.arguments for d in deltas) == finish.tool_calls[0].arguments
    assert all(not m.text for m in messages[:-1])
    jsonschema.validate(json.loads(finish.tool_calls[0].arguments), CLOCK)
    history = list(request.messages) + [
        inference_pb2.ChatMessage(role="assistant", tool_calls=finish.tool_calls),
        inference_pb2.ChatMessage(role="tool", tool_call_id=finish.tool_calls[0].id, content="12:00")]
    answer = list(daemon.inference().Chat(inference_pb2.ChatRequest(
        model="mlx", messages=history, tools_json=json.dumps(TOOLS), max_tokens=4, seed=1,
        tool_choice=inference_pb2.ToolChoice(mode="none")), timeout=60))
    assert answer[-1].finish.reason in ("stop", "length") and not answer[-1].finish.tool_calls


def test_langchain_bind_tools_and_structured_output(daemon):
    langchain_openai = pytest.importorskip("langchain_openai")
    from typing import Literal

    from pydantic import BaseModel, ConfigDict, Field

    class GetWeather(BaseModel):
        """The weather in a city."""

        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=10)
        unit: Literal["c", "f"]

    class Verdict(BaseModel):
        model_config = ConfigDict(extra="forbid")
        answer: str = Field(max_length=12)
        score: int = Field(ge=0, le=9)

    llm = langchain_openai.ChatOpenAI(base_url=daemon.http_url, api_key="unused", model="demo", max_tokens=120,
                                      seed=5, max_retries=0, timeout=120)
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Rome?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and GetWeather(**call["args"])
    verdict = llm.with_structured_output(Verdict).invoke("Judge it.")
    assert isinstance(verdict, Verdict) and 0 <= verdict.score <= 9
