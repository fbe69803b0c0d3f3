"""The OpenAI-compatible HTTP API of a real daemon, through the official `openai` SDK, curl and raw sockets.

One daemon for the module: the demo model (with the demo chat template), null-lm (no template), the slow model
(one slot, a queue of one: it can be held busy) and a model with no worker and none coming.
"""

import http.client
import json
import shutil
import socket
import subprocess
import time
import urllib.parse

import openai
import pytest

from support import DEMO_ONE_WORKER, Stream, metric, running_daemon, wait_for

USER = [{"role": "user", "content": "What does the module provide?"}]
HUGE_BYTES = 9 << 20  # over the 8 MiB cap


@pytest.fixture(scope="module")
def daemon(demo_model, slow_model, tmp_path_factory):
    config = '[daemon]\nhealth_interval = "0.5s"\n' + DEMO_ONE_WORKER + f"""
[[models]]
name = "null"
backend = "null-lm"

[[models]]
name = "slow"
backend = "torch-lm"
path = "{slow_model}"
concurrency = 1
queue = 1
threads = 1

[[models]]
name = "off"
backend = "null-lm"
replicas = 0
"""
    with running_daemon(tmp_path_factory.mktemp("openai"), config, 3) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(daemon):
    with openai.OpenAI(base_url=daemon.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        yield client


def chat(client, stream=False, **fields):
    fields.setdefault("model", "demo")
    fields.setdefault("messages", USER)
    return client.chat.completions.create(stream=stream, **fields)


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" if hasattr(c.choices[0], "delta") else c.choices[0].text
              for c in chunks if c.choices]
    return "".join(pieces), chunks


def test_models_are_listed_and_retrieved(client):
    assert [m.id for m in client.models.list()] == ["demo", "null", "off", "slow"]
    assert client.models.retrieve("demo").owned_by == "mpsd"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_chat_completion_whole_and_streamed_agree_for_a_greedy_request(client):
    whole = chat(client, max_tokens=24, temperature=0)
    assert whole.object == "chat.completion" and whole.model == "demo"
    reply = whole.choices[0]
    assert reply.message.role == "assistant" and reply.message.content and reply.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 24 and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    text, chunks = streamed_text(chat(client, stream=True, max_tokens=24, temperature=0,
                                      stream_options={"include_usage": True}))
    assert text == reply.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == reply.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_a_completion_whole_and_streamed(client):
    whole = client.completions.create(model="demo", prompt="The module provides", max_tokens=16, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text and whole.usage.prompt_tokens > 0
    text, chunks = streamed_text(client.completions.create(model="demo", prompt="The module provides", max_tokens=16,
                                                           temperature=0, stream=True))
    assert text == whole.choices[0].text and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_over_http_is_what_grpc_chat_gives(daemon, client):
    from mpsd.client import Client

    over_http = chat(client, max_tokens=16, temperature=0).choices[0].message.content
    with Client(daemon.address) as grpc_client:
        assert grpc_client.chat(USER, "demo", max_tokens=16, temperature=0).text() == over_http


def test_a_seeded_request_reproduces(client):
    answers = [chat(client, max_tokens=20, temperature=1.0, seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert answers[0] == answers[1] and answers[0] != answers[2]


def test_stop_ends_the_answer_before_the_stop_text(client):
    full = chat(client, max_tokens=24, temperature=0).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    stopped = chat(client, max_tokens=24, temperature=0, stop=[stop, "never seen"]).choices[0]
    assert stopped.message.content == expected and stopped.finish_reason == "stop"
    text, chunks = streamed_text(chat(client, stream=True, max_tokens=24, temperature=0, stop=stop))
    assert text == expected and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "beep"}]}, "messages[0].role"),
    ({"tools": [{"type": "function", "function": {"name": "now", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"max_tokens": 5000}, "max_tokens"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_requests_raise_bad_request_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as refused:
        chat(client, **fields)
    assert refused.value.status_code == 400 and refused.value.body["param"] == param


def test_a_model_without_a_chat_template_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError, match="model 'null' has no chat template; use Generate"):
        chat(client, model="null")


def test_unknown_model_is_not_found_and_no_worker_is_unavailable(client):
    with pytest.raises(openai.NotFoundError, match="no model named 'nope'"):
        chat(client, model="nope")
    with pytest.raises(openai.InternalServerError) as unavailable:
        client.completions.create(model="off", prompt="The")
    assert unavailable.value.status_code == 503 and "none is coming" in unavailable.value.message


def test_a_full_queue_is_rate_limited_and_a_passed_deadline_is_504(daemon, client):
    running = Stream(daemon, 1000, model="slow").started()
    try:
        with pytest.raises(openai.InternalServerError) as late:
            client.completions.create(model="slow", prompt="The", max_tokens=4,
                                      extra_headers={"X-Request-Timeout": "0.3"})
        assert late.value.status_code == 504 and "deadline passed while queued" in late.value.message
        queued = Stream(daemon, 4, model="slow")
        try:
            wait_for(lambda: metric(daemon, "mpsd_queue_depth", model="slow") == 1, 30, "the queued request")
            with pytest.raises(openai.RateLimitError, match="queue is full"):
                client.completions.create(model="slow", prompt="The", max_tokens=4)
        finally:
            running.cancel()
            assert queued.join(60).completed
    finally:
        running.cancel()


def test_curl_reads_the_server_sent_events_as_they_come(daemon):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"model": "demo", "messages": USER, "max_tokens": 8, "temperature": 0, "stream": True})
    result = subprocess.run(["curl", "-sN", f"{daemon.http_url}/chat/completions", "-H", "Content-Type: application/json",
                             "-d", body], capture_output=True, text=True, timeout=60, check=True)
    events = [line for line in result.stdout.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[0]["object"] == "chat.completion.chunk" and chunks[-1]["choices"][0]["finish_reason"]


def raw_request(daemon, head: str, body: bytes = b"") -> socket.socket:
    url = urllib.parse.urlsplit(daemon.http_url)
    sock = socket.create_connection((url.hostname, url.port), timeout=30)
    sock.sendall(head.encode() + b"\r\n\r\n" + body)
    return sock


def post_stream(daemon, payload: dict) -> socket.socket:
    body = json.dumps({**payload, "stream": True}).encode()
    return raw_request(daemon, f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}", body)


def worker_tokens(daemon, worker_id: str) -> int:
    return daemon.worker(worker_id)["tokens"]


def test_a_client_that_disconnects_mid_stream_stops_the_generation(daemon):
    before = metric(daemon, "mpsd_requests_total", model="slow", method="Generate", protocol="http", code="CANCELLED")
    started_at = worker_tokens(daemon, "slow-0")
    sock = post_stream(daemon, {"model": "slow", "prompt": "The", "max_tokens": 1000, "temperature": 0})
    received = b""
    while received.count(b"data: ") < 4:
        received += sock.recv(65536)
    sock.close()
    wait_for(lambda: daemon.worker("slow-0")["running_sequences"] == 0, 30, "the worker to drop the sequence")
    time.sleep(1.0)  # past the next probe, which carries the worker's own count
    stopped_at = worker_tokens(daemon, "slow-0")
    time.sleep(1.0)
    assert worker_tokens(daemon, "slow-0") == stopped_at < started_at + 1000  # its token counter stopped, early
    wait_for(lambda: metric(daemon, "mpsd_requests_total", model="slow", method="Generate", protocol="http",
                            code="CANCELLED") == before + 1, 30, "the cancel counted")


def test_a_client_that_disconnects_while_queued_leaves_the_queue(daemon):
    running = Stream(daemon, 1000, model="slow").started()
    try:
        sock = post_stream(daemon, {"model": "slow", "prompt": "The", "max_tokens": 4})
        wait_for(lambda: metric(daemon, "mpsd_queue_depth", model="slow") == 1, 30, "the HTTP request queued")
        sock.close()
        wait_for(lambda: metric(daemon, "mpsd_queue_depth", model="slow") == 0, 30, "the queue to empty")
        assert running.alive
    finally:
        running.cancel()


def post_json(daemon, body: bytes, path: str = "/v1/chat/completions") -> tuple[int, dict]:
    url = urllib.parse.urlsplit(daemon.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.parametrize("body, param, sentence", [
    (b'{"model": "demo", "messages": [', None, "body: not valid JSON"),
    (b'["a list"]', None, "body: must be a JSON object"),
    (b'{"model": "demo", "messages": "hi"}', "messages", "messages: must be a list"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', "max_tokens",
     "max_tokens: must be an integer"),
    (b'{"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', "temperature",
     "temperature: must be a number"),
    (b'{"model": "demo", "messages": []}', "messages", "messages: must not be empty"),
    (b'{"model": "demo", "messages": [{"role": "wizard", "content": "hi"}]}', "messages[0].role",
     "messages[0].role: must be one of"),
])
def test_bad_input_gets_a_4xx_naming_the_field(daemon, body, param, sentence):
    status, answer = post_json(daemon, body)
    assert status == 400 and answer["error"]["param"] == param and answer["error"]["message"].startswith(sentence)


def test_a_huge_body_gets_413_and_the_daemon_keeps_serving(daemon):
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {HUGE_BYTES}"
    sock = raw_request(daemon, head, b"x" * 65536)  # the head says it all: the rest is never read
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["param"] == "body"
    status, answer = post_json(daemon, b"{" + b'"pad": "' + b"x" * HUGE_BYTES + b'"}')  # sent in full, as httpx does
    assert status == 413
    status, answer = post_json(daemon, json.dumps({"model": "demo", "messages": USER, "max_tokens": 2}).encode())
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


def test_http_requests_are_counted_with_their_protocol(daemon, client):
    labels = {"model": "demo", "method": "Chat", "protocol": "http", "code": "OK"}
    bad = {"model": "(unknown)", "method": "Chat", "protocol": "http", "code": "INVALID_ARGUMENT"}
    before, bad_before = metric(daemon, "mpsd_requests_total", **labels), metric(daemon, "mpsd_requests_total", **bad)
    chat(client, max_tokens=2)
    assert post_json(daemon, b"{")[0] == 400
    assert metric(daemon, "mpsd_requests_total", **labels) == before + 1
    assert metric(daemon, "mpsd_requests_total", **bad) == bad_before + 1
