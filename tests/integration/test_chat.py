"""gRPC Chat through a real daemon: the model's own template applied in the worker, refusals, and `mpsctl chat`.

One daemon for the module: the demo model (which ships the demo chat template), a copy of it without the
template, and null-lm (no tokenizer, no template).
"""

import os
import select
import shutil
import subprocess
import sys
import time

import grpc
import pytest

from mpsd.client import Client, InvalidRequest
from mpsd.demo.chat_template import TEMPLATE_FILE
from mpsd.v1 import inference_pb2
from support import DEMO_ONE_WORKER, metric, running_daemon

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does the module do?"}]
RENDERED = "system: Be brief.<|endoftext|>user: What does the module do?<|endoftext|>assistant:"


@pytest.fixture(scope="module")
def daemon(demo_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    plain = folder / "plain-model"
    shutil.copytree(demo_model, plain, ignore=shutil.ignore_patterns(TEMPLATE_FILE))
    config = DEMO_ONE_WORKER + f"""
[[models]]
name = "plain"
backend = "torch-lm"
path = "{plain}"
threads = 1

[[models]]
name = "null"
backend = "null-lm"
"""
    with running_daemon(folder / "daemon", config, 3) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def client(daemon):
    with Client(daemon.address) as client:
        yield client


def chat_request(messages, **fields) -> inference_pb2.ChatRequest:
    fields.setdefault("model", "demo")
    return inference_pb2.ChatRequest(messages=[inference_pb2.ChatMessage(**m) for m in messages], **fields)


def test_chat_is_generate_on_the_prompt_the_template_renders(daemon, client):
    chat = client.chat(CONVERSATION, "demo", max_tokens=24, temperature=0)
    text = chat.text()
    generated = client.generate(RENDERED, "demo", max_tokens=24, temperature=0)
    assert text == generated.text() and text
    assert chat.finish.prompt_tokens == generated.finish.prompt_tokens and chat.finish.worker_id == "demo-0"


def test_chat_streams_its_tokens_in_order(daemon):
    messages = list(daemon.inference().Chat(chat_request(CONVERSATION, max_tokens=8, temperature=0), timeout=60))
    assert [m.index for m in messages[:-1]] == list(range(8)) and messages[-1].finish.reason == "length"


@pytest.mark.parametrize("model", ["plain", "null"])
def test_a_model_without_a_chat_template_is_a_failed_precondition(daemon, model):
    with pytest.raises(grpc.RpcError) as refused:
        list(daemon.inference().Chat(chat_request(CONVERSATION, model=model), timeout=60))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == f"model '{model}' has no chat template; use Generate"


@pytest.mark.parametrize("messages, fields, sentence", [
    ([], {}, "messages: must not be empty"),
    ([{"role": "user", "content": "Hi"}, {"role": "narrator", "content": "x"}], {},
     "messages[1].role: must be one of system, user, assistant, tool, got 'narrator'"),
    ([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "12:00"}], {},
     "messages[1].tool_call_id: required for a 'tool' message"),
    ([{"role": "user", "content": "Hi"}], {"tools_json": '[{"type": "function"}]'},
     "tools[0].function: must be an object"),
    ([{"role": "user", "content": "Hi"}], {"tools_json": "not json"}, "tools: not valid JSON"),
    ([{"role": "user", "content": "Hi"}], {"max_tokens": 5000}, "max_tokens: 5000 is above the model's limit of 1024"),
    ([{"role": "user", "content": "word " * 1200}], {}, "messages: "),
])
def test_bad_chats_are_invalid_argument_naming_the_field(daemon, messages, fields, sentence):
    with pytest.raises(grpc.RpcError) as refused:
        list(daemon.inference().Chat(chat_request(messages, **fields), timeout=60))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith(sentence), refused.value.details()


def test_chat_calls_are_counted_as_chat(daemon, client):
    labels = {"model": "demo", "method": "Chat", "protocol": "grpc"}
    ok, refused = (metric(daemon, "mpsd_requests_total", code=code, **labels) for code in ("OK", "INVALID_ARGUMENT"))
    client.chat(CONVERSATION, "demo", max_tokens=2).text()
    with pytest.raises(InvalidRequest):
        client.chat([], "demo").text()
    assert metric(daemon, "mpsd_requests_total", code="OK", **labels) == ok + 1
    assert metric(daemon, "mpsd_requests_total", code="INVALID_ARGUMENT", **labels) == refused + 1


def mpsctl(daemon, *args, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "chat", "--address", daemon.address, *args],
                          input=stdin, capture_output=True, text=True, timeout=60)


def test_mpsctl_chat_answers_one_message_or_piped_stdin(daemon, client):
    expected = client.chat([{"role": "user", "content": "Hello there"}], "demo", max_tokens=12, temperature=0).text()
    one = mpsctl(daemon, "--model", "demo", "--max-tokens", "12", "--temperature", "0", "Hello there")
    assert one.returncode == 0 and one.stdout == expected + "\n" and "12 generated tokens" in one.stderr
    piped = mpsctl(daemon, "--model", "demo", "--max-tokens", "12", "--temperature", "0", stdin="Hello there")
    assert piped.returncode == 0 and piped.stdout == expected + "\n"
    refused = mpsctl(daemon, "--model", "null", "Hello")
    assert refused.returncode == 1 and "FAILED_PRECONDITION: model 'null' has no chat template" in refused.stderr


def test_mpsctl_chat_on_a_terminal_keeps_the_conversation(daemon, client):
    transcript = chat_on_a_terminal(daemon, ["Hello", "And then?"], "--model", "demo", "--max-tokens", "10",
                                    "--temperature", "0", "--system", "Be brief.")
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    first = client.chat(history, "demo", max_tokens=10, temperature=0).text()
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And then?"}]
    second = client.chat(history, "demo", max_tokens=10, temperature=0).text()
    assert f"you> Hello\n{first}\nyou> And then?\n{second}\nyou> " in transcript


def chat_on_a_terminal(daemon, lines: list[str], *args: str) -> str:
    """Runs `mpsctl chat` on a pseudo-terminal, types each line once the prompt shows, then Ctrl-D."""
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "mpsd.cli.mpsctl", "chat", "--address", daemon.address, *args],
                               stdin=follower, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    transcript = b""

    def read_until_prompts(count: int) -> None:
        nonlocal transcript
        deadline = time.monotonic() + 60
        while transcript.count(b"you> ") < count:
            assert time.monotonic() < deadline, f"no prompt: {transcript!r}"
            if select.select([leader], [], [], 1)[0]:
                transcript += os.read(leader, 65536)

    try:
        read_until_prompts(1)
        for typed, line in enumerate(lines, start=2):
            os.write(leader, line.encode() + b"\n")
            read_until_prompts(typed)
        os.write(leader, b"\x04")  # Ctrl-D at the prompt ends the conversation
        assert process.wait(30) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        os.close(leader)
    return transcript.decode(errors="replace").replace("\r\n", "\n")
