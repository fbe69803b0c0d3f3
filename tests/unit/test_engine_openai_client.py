"""The worker's client of an engine's OpenAI API (worker/engine/openai_client.py): bodies, SSE, finish and usage,
and EngineCall against a tiny HTTP server on a real loopback socket."""

import http.server
import json
import socket
import threading
import time

import pytest

from mpsd.chat_params import ChatMessage, ChatParams, ToolCall
from mpsd.generate_params import GenerateParams, InvalidRequest
from mpsd.worker.backends.base import Finished, TokenEvent, ToolCallEvent
from mpsd.worker.engine.openai_client import (EngineCall, EngineError, chat_body, completions_body, finished,
                                              sse_events)
from mpsd.worker.engine.prompt_count import PromptCounter
from mpsd.worker.scheduler import DeadlinePassed, OutOfMemory


def params(**changes) -> GenerateParams:
    fields = dict(prompt="Once upon", max_tokens=12, temperature=0.7, top_p=0.9, seed=None, stop=())
    return GenerateParams(**{**fields, **changes})


# -- request bodies -------------------------------------------------------------------------------------------------

def test_completions_body_streams_asks_for_usage_and_leaves_out_what_was_not_given():
    assert completions_body(params()) == {
        "prompt": "Once upon", "max_tokens": 12, "temperature": 0.7, "top_p": 0.9,
        "stream": True, "stream_options": {"include_usage": True}}


def test_completions_body_passes_stop_and_seed_when_given():
    body = completions_body(params(stop=("\n\n", "END"), seed=0, temperature=0.0))
    assert body["stop"] == ["\n\n", "END"] and body["seed"] == 0 and body["temperature"] == 0.0
    assert "model" not in body, "mlx_lm.server would take a model name as one to load"
    json.dumps(body)


def test_chat_body_sends_messages_and_tools_with_the_same_sampling():
    tool = {"type": "function", "function": {"name": "clock", "parameters": {"type": "object"}}}
    chat = ChatParams(messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Time?")), tools=(tool,),
                      sampling=params(prompt="", seed=7))
    assert chat_body(chat) == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"}],
        "tools": [tool], "tool_choice": "auto", "max_tokens": 12, "temperature": 0.7, "top_p": 0.9, "seed": 7,
        "stream": True, "stream_options": {"include_usage": True}}
    no_tools = chat_body(ChatParams(messages=(ChatMessage("user", "hi"),), tools=None, sampling=params(prompt="")))
    assert "tools" not in no_tools and "prompt" not in no_tools


# -- finish reason and usage ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("reason, expected", [("length", "length"), ("stop", "stop"), ("eos", "stop"),
                                              ("tool_calls", "stop")])
def test_finished_is_length_only_for_length(reason, expected):
    assert finished(reason, {"prompt_tokens": 3, "completion_tokens": 4}, 9).reason == expected


def test_finished_takes_usage_and_cached_tokens():
    usage = {"prompt_tokens": 40, "completion_tokens": 5, "prompt_tokens_details": {"cached_tokens": 32}}
    assert finished("stop", usage, 2) == Finished("stop", 40, 5, 32)
    assert finished("stop", {"prompt_tokens": 40, "completion_tokens": 5, "prompt_tokens_details": None}, 2) == \
        Finished("stop", 40, 5, 0)


def test_finished_without_usage_counts_the_text_pieces():
    assert finished("length", None, 7) == Finished("length", 0, 7, 0)
    assert finished("stop", {"prompt_tokens": 6}, 3) == Finished("stop", 6, 3, 0)


# -- server-sent events ---------------------------------------------------------------------------------------------

def test_sse_events_skips_comments_blank_lines_and_fields_and_stops_at_done():
    lines = [b": keep-alive\n", b"\n", b"event: message\n", b"id: 1\n", b'data: {"a": 1}\r\n', b"\n",
             b'data:{"b": 2}\n', b"data: 5\n", b"data: [DONE]\n", b'data: {"after": "done"}\n']
    assert list(sse_events(iter(lines))) == [{"a": 1}, {"b": 2}]


def test_sse_events_ends_with_the_stream_when_there_is_no_done():
    assert list(sse_events(iter([b'data: {"a": 1}\n']))) == [{"a": 1}]


def test_sse_events_refuses_an_event_that_is_not_json():
    events = sse_events(iter([b'data: {"a": 1}\n', b"data: <html>oops\n"]))
    assert next(events) == {"a": 1}
    with pytest.raises(EngineError, match=r"the engine sent an event that is not JSON: '<html>oops'"):
        next(events)


# -- EngineCall against a real loopback server ------------------------------------------------------------------------

class Engine(http.server.ThreadingHTTPServer):
    """A tiny engine: records each POST and answers it with `answer(handler)`, which a test sets."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests: list[tuple[str, dict, dict]] = []
        self.release = threading.Event()  # what a holding answer waits for; set at teardown
        self.answer = lambda handler: None

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request, client_address) -> None:
        pass  # a write to a client that went away (cancel, deadline) is expected here


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        self.server.answer(self)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def engine():
    server = Engine()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()
    thread.join(2)


def data(event) -> str:
    return event if isinstance(event, str) else "data: " + json.dumps(event)


def stream(events, *, chunked: bool = True, hold: bool = False, together: bool = False):
    """An answer streaming `events` as SSE: chunked (HTTP/1.1, llama-server) or ended by closing (HTTP/1.0, an
    http.server engine such as mlx_lm.server); `hold`: then silent until the test ends; `together`: in one write."""
    def answer(handler: Handler) -> None:
        if chunked:
            handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        if chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        pieces = [(data(event) + "\n\n").encode() for event in events]
        for piece in [b"".join(pieces)] if together else pieces:
            handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        if hold:
            handler.server.release.wait(5)
        if chunked:
            handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True
    return answer


def status(code: int, body: str):
    def answer(handler: Handler) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body.encode())))
        handler.end_headers()
        handler.wfile.write(body.encode())
    return answer


def piece(text: str, reason=None) -> dict:
    return {"choices": [{"index": 0, "text": text, "finish_reason": reason}]}


def delta(content=None, reason=None, **more) -> dict:
    return {"choices": [{"index": 0, "delta": {**({"content": content} if content is not None else {}), **more},
                         "finish_reason": reason}]}


USAGE = {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 2}}}


def call(engine: Engine, *, chat: bool = False, deadline: float | None = None, body: dict | None = None) -> EngineCall:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    return EngineCall(engine.port, path, body or completions_body(params()), deadline, chat=chat)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_a_completion_streams_text_events_with_indexes_then_finished(engine, chunked):
    engine.answer = stream([": ping", piece("Hel"), piece(""), piece("lo"), piece(" there", "length"), USAGE,
                            "data: [DONE]"], chunked=chunked)
    body = completions_body(params(seed=3))
    assert list(call(engine, body=body)) == [TokenEvent(0, 0, "Hel"), TokenEvent(1, 0, "lo"),
                                             TokenEvent(2, 0, " there"), Finished("length", 4, 3, 2)]
    [(path, headers, sent)] = engine.requests
    assert path == "/v1/completions" and sent == body
    assert headers["Content-Type"] == "application/json" and headers["Accept"] == "text/event-stream"


def test_a_chat_streams_delta_content_and_counts_pieces_without_usage(engine):
    engine.answer = stream([delta(role="assistant"), delta("It is "), delta("noon."), delta(reason="stop"),
                            "data: [DONE]"])
    chat = ChatParams(messages=(ChatMessage("user", "Time?"),), tools=None, sampling=params(prompt=""))
    events = list(call(engine, chat=True, body=chat_body(chat)))
    assert events == [TokenEvent(0, 0, "It is "), TokenEvent(1, 0, "noon."), Finished("stop", 0, 2, 0)]
    assert engine.requests[0][0] == "/v1/chat/completions"


def test_a_chats_tool_calls_from_the_engine_stream_as_tool_call_events_and_end_whole_in_finished(engine):
    """llama-server's shape: id and name first, then argument fragments; a second call by its own index."""
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "clock", "arguments": ""}}
    second = {"index": 1, "id": "call_b", "type": "function", "function": {"name": "add", "arguments": '{"a":1}'}}
    engine.answer = stream([delta(role="assistant"), delta("Let me look."), delta(tool_calls=[first]),
                            delta(tool_calls=[{"index": 0, "function": {"arguments": '{"zone":'}}]),
                            delta(tool_calls=[{"index": 0, "function": {"arguments": '"UTC"}'}}]),
                            delta(tool_calls=[second]), delta(reason="tool_calls"), "data: [DONE]"])
    chat = ChatParams(messages=(ChatMessage("user", "Time?"),), tools=None, sampling=params(prompt=""))
    events = list(call(engine, chat=True, body=chat_body(chat)))
    assert events[:-1] == [TokenEvent(0, 0, "Let me look."), ToolCallEvent(1, 0, 0, "call_a", "clock", ""),
                           ToolCallEvent(2, 0, 0, "", "", '{"zone":'), ToolCallEvent(3, 0, 0, "", "", '"UTC"}'),
                           ToolCallEvent(4, 0, 1, "call_b", "add", '{"a":1}')]
    assert events[-1] == Finished("tool_calls", 0, 5, 0, tool_calls=(ToolCall("call_a", "clock", '{"zone":"UTC"}'),
                                                                    ToolCall("call_b", "add", '{"a":1}')))


def test_an_engines_tool_call_without_an_id_gets_one(engine):
    engine.answer = stream([delta(tool_calls=[{"function": {"name": "clock", "arguments": "{}"}}]),
                            delta(reason="tool_calls"), "data: [DONE]"])
    chat = ChatParams(messages=(ChatMessage("user", "Time?"),), tools=None, sampling=params(prompt=""))
    event, done = list(call(engine, chat=True, body=chat_body(chat)))
    assert event.id.startswith("call_") and done.tool_calls == (ToolCall(event.id, "clock", "{}"),)


def test_http_400_is_an_invalid_request_naming_the_engines_message(engine):
    engine.answer = status(400, json.dumps({"error": {"message": "the request exceeds the available context size\n"
                                                                  "  (4096 tokens)", "type": "invalid_request_error"}}))
    with pytest.raises(InvalidRequest, match=r"^the engine refused the request \(HTTP 400\): the request exceeds the "
                                             r"available context size \(4096 tokens\)$"):
        list(call(engine))


def test_http_4xx_with_a_detail_body_or_plain_text_is_named_too(engine):
    engine.answer = status(422, json.dumps({"detail": "max_tokens must be positive"}))
    with pytest.raises(InvalidRequest, match=r"\(HTTP 422\): max_tokens must be positive$"):
        list(call(engine))
    engine.answer = status(404, "no such route")
    with pytest.raises(InvalidRequest, match=r"\(HTTP 404\): no such route$"):
        list(call(engine))


@pytest.mark.parametrize("body, meaning", [
    ('{"error": {"code": 500, "message": "out of memory", "type": "server_error"}}', "the engine said it ran out"),
    ('{"error": {"message": "prefill failed"}}', "ds4-server answers so when it runs out of memory"),
])
def test_http_500_with_an_oom_text_is_out_of_memory(engine, body, meaning):
    engine.answer = status(500, body)
    with pytest.raises(OutOfMemory, match=rf"^out of memory \(.*{meaning}.*\): the engine answered HTTP 500: "):
        list(call(engine))


def test_an_oom_text_in_a_4xx_is_not_out_of_memory(engine):
    engine.answer = status(400, '{"error": {"message": "out of memory"}}')
    with pytest.raises(InvalidRequest, match=r"\(HTTP 400\): out of memory"):
        list(call(engine))


def test_another_http_500_is_an_engine_error(engine):
    engine.answer = status(500, '{"error": {"message": "template render failed"}}')
    with pytest.raises(EngineError, match=r"^the engine answered HTTP 500: template render failed$"):
        list(call(engine))


def test_an_error_event_in_the_stream_is_read_as_a_500(engine):
    engine.answer = stream([piece("a"), {"error": {"message": "out of memory"}}])
    events = call(engine)
    iterator = iter(events)
    assert next(iterator) == TokenEvent(0, 0, "a")
    with pytest.raises(OutOfMemory, match=r"the engine answered HTTP 500: out of memory"):
        next(iterator)


def test_a_stream_without_a_finish_reason_is_an_engine_error(engine):
    engine.answer = stream([piece("a"), piece("b"), USAGE, "data: [DONE]"])
    with pytest.raises(EngineError, match=r"^the engine ended its stream without a finish reason$"):
        list(call(engine))


def test_no_engine_listening_is_an_engine_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(EngineError, match=r"^engine connection failed: ConnectionRefusedError"):
        list(EngineCall(port, "/v1/completions", completions_body(params()), None, chat=False))


def iterate_and_cancel_after_first(engine_call: EngineCall) -> tuple[list, float]:
    """Iterates the call; a second thread cancels it once the first event is in. The events and the seconds taken."""
    events, start = [], time.monotonic()
    for event in engine_call:
        events.append(event)
        if len(events) == 1:
            threading.Thread(target=engine_call.cancel).start()
    return events, time.monotonic() - start


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "close-delimited"])
def test_cancel_from_another_thread_ends_the_iteration_without_error(engine, chunked):
    engine.answer = stream([piece("a")], chunked=chunked, hold=True)
    events, took = iterate_and_cancel_after_first(call(engine))
    assert events == [TokenEvent(0, 0, "a")] and took < 1


def test_events_already_received_are_not_yielded_after_cancel(engine):
    engine.answer = stream([piece("a"), piece("b"), piece("c")], together=True, hold=True)
    engine_call, events = call(engine), []
    for event in engine_call:
        events.append(event)
        engine_call.cancel()
    assert events == [TokenEvent(0, 0, "a")]


def test_a_call_cancelled_before_it_starts_yields_nothing(engine):
    engine.answer = stream([piece("a", "stop")])
    engine_call = call(engine)
    engine_call.cancel()
    assert list(engine_call) == []


@pytest.mark.parametrize("events", [[], [piece("a")]], ids=["before-headers", "mid-stream"])
def test_a_deadline_passing_while_the_engine_is_silent_is_deadline_passed(engine, events):
    engine.answer = stream(events, hold=True) if events else (lambda handler: handler.server.release.wait(5))
    start = time.monotonic()
    seen = []
    with pytest.raises(DeadlinePassed, match="deadline passed while the engine was answering"):
        for event in call(engine, deadline=start + 0.3):
            seen.append(event)
    assert 0.3 <= time.monotonic() - start < 1
    assert seen == [TokenEvent(0, 0, "a") for _ in events]


def test_a_deadline_already_passed_between_events_is_deadline_passed(engine):
    engine.answer = stream([piece("a"), piece("b", "stop")])
    engine_call = call(engine, deadline=time.monotonic() + 0.2)
    iterator = iter(engine_call)
    assert next(iterator) == TokenEvent(0, 0, "a")
    time.sleep(0.25)
    with pytest.raises(DeadlinePassed):
        next(iterator)


# -- prompt tokens for engines whose streams carry no usage (llama-cpp-python) ----------------------------------------

def test_a_stream_without_prompt_tokens_asks_count_prompt_and_one_with_them_does_not(engine):
    asked = []
    engine.answer = stream([piece("a"), piece("b", "stop"), "data: [DONE]"])
    events = list(EngineCall(engine.port, "/v1/completions", completions_body(params()), None, chat=False,
                             count_prompt=lambda: asked.append(1) or 5))
    assert events[-1] == Finished("stop", 5, 2, 0) and asked == [1]
    engine.answer = stream([piece("a", "stop"), USAGE, "data: [DONE]"])
    events = list(EngineCall(engine.port, "/v1/completions", completions_body(params()), None, chat=False,
                             count_prompt=lambda: asked.append(1) or 5))
    assert events[-1] == Finished("stop", 4, 3, 2) and asked == [1]


def tokenizer(paths: dict[str, dict]):
    """An engine that answers POST path with paths[path] as JSON, and 404 to any other path."""
    def answer(handler: Handler) -> None:
        status(200, json.dumps(paths[handler.path]))(handler) if handler.path in paths else status(404, "{}")(handler)
    return answer


def test_prompt_counter_finds_llama_servers_tokenize_and_asks_only_it_from_then_on(engine):
    engine.answer = tokenizer({"/tokenize": {"tokens": [1, 2, 3, 4]}})
    counter = PromptCounter(engine.port)
    assert counter.count("The module provides") == 4
    assert [(path, body) for path, _, body in engine.requests] == [
        ("/extras/tokenize/count", {"input": "The module provides", "add_special": True}),
        ("/tokenize", {"content": "The module provides", "add_special": True})]
    assert counter.count("again") == 4 and [path for path, _, _ in engine.requests[2:]] == ["/tokenize"]


def test_prompt_counter_reads_llama_cpp_pythons_count(engine):
    engine.answer = tokenizer({"/extras/tokenize/count": {"count": 3}})
    assert PromptCounter(engine.port).count("The module provides") == 3 and len(engine.requests) == 1


def test_prompt_counter_gives_0_and_stops_asking_an_engine_without_a_tokenize_endpoint(engine):
    engine.answer = tokenizer({})
    counter = PromptCounter(engine.port)
    assert counter.count("x") == 0 and counter.count("y") == 0 and len(engine.requests) == 2


def test_prompt_counter_gives_0_without_forgetting_when_the_engine_does_not_answer():
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    counter = PromptCounter(port)
    assert counter.count("x") == 0 and len(counter._endpoints) == 2  # no answer is no verdict: asked again next time
