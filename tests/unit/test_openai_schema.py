"""The OpenAI-compatible API's parsing and answers, without a server: JSON in, mpsd requests and OpenAI shapes out."""

import json

import grpc
import pytest
from mpsd.supervisor.edge.http.openai_schema import (
    SSE_DONE,
    Answer,
    BadField,
    decode_body,
    error_for,
    models_list,
    parse_chat,
    parse_completion,
    sse,
)
from mpsd.v1 import inference_pb2

USER = [{"role": "user", "content": "Hello"}]


def test_a_chat_body_becomes_the_chat_request_a_grpc_client_would_send():
    completion = parse_chat({"model": "demo", "messages": [{"role": "developer", "content": "Be brief."}, *USER],
                             "max_tokens": 40, "temperature": 0.5, "top_p": 0.9, "seed": 7, "stop": "\n",
                             "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"})
    assert completion.method == "Chat" and completion.stream and completion.include_usage
    assert completion.request == inference_pb2.ChatRequest(
        model="demo", messages=[inference_pb2.ChatMessage(role="system", content="Be brief."),
                                inference_pb2.ChatMessage(role="user", content="Hello")],
        max_tokens=40, temperature=0.5, top_p=0.9, seed=7, stop=["\n"])


def test_unset_fields_stay_unset_so_mpsd_defaults_apply():
    request = parse_chat({"messages": USER, "temperature": None, "stop": None}).request
    assert not any(request.HasField(f) for f in ("max_tokens", "temperature", "top_p", "seed"))
    assert request.model == "" and list(request.stop) == [] and request.tools_json == ""


def test_max_completion_tokens_wins_over_max_tokens():
    request = parse_chat({"messages": USER, "max_tokens": 5, "max_completion_tokens": 9}).request
    assert request.max_tokens == 9


def test_text_parts_are_joined_and_null_content_is_empty():
    content = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    request = parse_chat({"messages": [{"role": "user", "content": content},
                                       {"role": "assistant", "content": None}]}).request
    assert [m.content for m in request.messages] == ["one\ntwo", ""]


def test_tools_travel_as_json_for_the_template():
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    assert json.loads(parse_chat({"messages": USER, "tools": tools}).request.tools_json) == tools
    assert parse_chat({"messages": USER, "tools": []}).request.tools_json == ""


def test_a_completion_body_becomes_a_generate_request():
    completion = parse_completion({"model": "demo", "prompt": ["The module"], "max_tokens": 8, "stop": ["a", "b"]})
    assert completion.method == "Generate" and not completion.stream
    assert completion.request == inference_pb2.GenerateRequest(model="demo", prompt="The module", max_tokens=8,
                                                                stop=["a", "b"])


@pytest.mark.parametrize("body, param", [
    ({"messages": USER, "n": 2}, "n"),
    ({"messages": USER, "logprobs": True}, "logprobs"),
    ({"messages": USER, "top_logprobs": 3}, "top_logprobs"),
    ({"messages": USER, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": USER, "frequency_penalty": 1}, "frequency_penalty"),
    ({"messages": USER, "logit_bias": {"50256": -100}}, "logit_bias"),
    ({"messages": USER, "response_format": "json"}, "response_format"),
    ({"messages": USER, "response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
     "response_format.json_schema.schema"),
    ({"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"schema": {}, "strict": 1}}},
     "response_format.json_schema.strict"),
    ({"messages": USER, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"messages": USER, "tool_choice": 3}, "tool_choice"),
    ({"messages": USER, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": USER, "tools": {"a": 1}}, "tools"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls[0]"),
    ({"messages": [{"role": "assistant", "tool_calls": {"id": "1"}}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "f"}}]}]},
     "messages[0].tool_calls[0].id"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": 3}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": 3, "content": "x"}]}, "messages[0].role"),
    ({"messages": ["hello"]}, "messages[0]"),
    ({"messages": "hello"}, "messages"),
    ({}, "messages"),
    ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": USER, "max_tokens": True}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": USER, "max_tokens": 2**31}, "max_tokens"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "seed": -1}, "seed"),
    ({"messages": USER, "seed": 1.5}, "seed"),
    ({"messages": USER, "stop": [1]}, "stop"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"messages": USER, "model": 7}, "model"),
])
def test_a_chat_field_that_cannot_be_honoured_is_refused_by_name(body, param):
    with pytest.raises(BadField) as refused:
        parse_chat(body)
    assert refused.value.param == param and str(refused.value).startswith(param + ": ")


@pytest.mark.parametrize("body, param", [
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "logprobs": 0}, "logprobs"),
    ({"prompt": "a", "best_of": 3}, "best_of"),
    ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "suffix": "end"}, "suffix"),
])
def test_a_completion_field_that_cannot_be_honoured_is_refused_by_name(body, param):
    with pytest.raises(BadField) as refused:
        parse_completion(body)
    assert refused.value.param == param


def test_neutral_values_of_unsupported_fields_are_accepted():
    parse_chat({"messages": USER, "n": 1, "logprobs": False, "presence_penalty": 0, "frequency_penalty": 0.0,
                "logit_bias": {}, "response_format": {"type": "text"}, "tool_choice": "none", "parallel_tool_calls": True})


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_refused(data):
    with pytest.raises(BadField) as refused:
        decode_body(data)
    assert refused.value.param is None and str(refused.value).startswith("body: ")


def finish(reason="stop", prompt=3, completion=2, cached=0):
    usage = inference_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
    return inference_pb2.Finish(reason=reason, usage=usage)


def test_whole_answers_have_openai_shapes_with_usage():
    chat = Answer(chat=True, model="demo", created=100, id="abc").whole("Hi there", finish())
    assert chat == {"id": "chatcmpl-abc", "object": "chat.completion", "created": 100, "model": "demo",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there"},
                                 "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                              "prompt_tokens_details": {"cached_tokens": 0}}}
    text = Answer(chat=False, model="demo", created=100, id="abc").whole("Hi", finish("length"))
    assert text["object"] == "text_completion" and text["id"] == "cmpl-abc"
    assert text["choices"] == [{"index": 0, "text": "Hi", "logprobs": None, "finish_reason": "length"}]


def test_chunks_carry_the_role_first_then_text_then_the_finish_then_usage():
    answer = Answer(chat=True, model="demo", created=100, id="abc")
    assert answer.chunk(first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert answer.chunk("Hi")["choices"][0] == {"index": 0, "delta": {"content": "Hi"}, "logprobs": None,
                                                  "finish_reason": None}
    assert answer.chunk(finish_reason="length")["choices"][0]["delta"] == {}
    assert answer.usage_chunk(finish())["choices"] == [] and answer.usage_chunk(finish())["usage"]["total_tokens"] == 5
    assert answer.usage_chunk(finish(cached=2))["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    assert answer.chunk("Hi")["object"] == "chat.completion.chunk"
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and SSE_DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("code, details, status, param", [
    (grpc.StatusCode.INVALID_ARGUMENT, "messages[1].role: must be one of system, user", 400, "messages[1].role"),
    (grpc.StatusCode.FAILED_PRECONDITION, "model 'null' has no chat template; use Generate", 400, None),
    (grpc.StatusCode.NOT_FOUND, "model: no model named 'x' (configured: demo)", 404, "model"),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "model 'slow': queue is full (1 waiting); retry later", 429, None),
    (grpc.StatusCode.UNAVAILABLE, "mpsd is draining for shutdown: not accepting new requests", 503, None),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "model 'slow': deadline passed while queued for a worker", 504, None),
    (grpc.StatusCode.INTERNAL, "worker demo-0 failed: boom", 500, None),
    (grpc.StatusCode.UNKNOWN, "what", 500, None),
])
def test_refusals_get_the_status_the_sdks_map_to_their_exceptions(code, details, status, param):
    got_status, body = error_for(code, details)
    assert got_status == status
    assert body["error"]["message"] == details and body["error"]["param"] == param
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_models_are_listed_as_openai_lists_them():
    assert models_list(["demo"], 5) == {"object": "list",
                                        "data": [{"id": "demo", "object": "model", "created": 5, "owned_by": "mpsd"}]}
