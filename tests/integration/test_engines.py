"""Engines mpsd did not write, supervised like its own workers: mlx_lm.server for real, a fake engine for failures.

mlx_lm.server (installed with the mlx extra) streams through gRPC and the
OpenAI API and is killed with kill -9 in every order; tests/fixtures/fake_engine.py
is a real HTTP server on a real socket that fails the ways engines fail here
(an HTTP 500 "prefill failed", a hang, a Metal out-of-memory abort), which no
engine on this machine can be made to do. Bad commands go FATAL naming the
command and its last lines.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import sys

import grpc
import psutil
import pytest

from mpsd.v1 import inference_pb2
from support import running_daemon, wait_for, write_probe

GiB = 1 << 30
FAKE_ENGINE = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "fake_engine.py"
PY = sys.executable

DAEMON = """
[daemon]
restart_delay = "0.1s"
restart_max_delay = "0.3s"
health_interval = "0.3s"
health_timeout = "3s"
"""


def engine_model(name: str, command: list[str], *, path: str | None = None, extra: str = "", replicas: int = 1) -> str:
    quoted = ", ".join(f'"{part}"' for part in command)
    return f"""
[[models]]
name = "{name}"
backend = "engine"
command = [{quoted}]
replicas = {replicas}
env = {{ OMP_NUM_THREADS = "1" }}
{f'path = "{path}"' if path else ""}
{extra}
"""


MLX_ENGINE = engine_model("mlxe", [PY, "-m", "mlx_lm.server", "--model", "{path}", "--port", "{port}"],
                          path="@mlx-demo", extra='start_timeout = "90s"')
FAKE = engine_model("fake", [PY, str(FAKE_ENGINE), "--port", "{port}"])
# Its first start says what an engine says when its port was taken between mpsd's pick and its bind, then exits.
PORT_TAKEN = engine_model("port-taken", ["sh", "-c", "if [ ! -e taken-once ]; then touch taken-once; echo 'OSError: "
                          "[Errno 98] Address already in use' >&2; exit 1; fi; exec $0 $1 --port $2",
                          PY, str(FAKE_ENGINE), "{port}"])
ON_DEMAND = engine_model("lazy", [PY, str(FAKE_ENGINE), "--port", "{port}"], replicas=0,
                         extra='min_replicas = 0\nmax_replicas = 1\nkeep_alive = "2s"')
BAD = (
    engine_model("missing", ["/nonexistent/llama-server", "--port", "{port}"])
    + engine_model("exits", ["sh", "-c", "echo 'error: unknown model format' >&2; exit 3", "sh", "{port}"])
    + engine_model("silent", ["sh", "-c", "echo listening elsewhere; exec sleep 600", "sh", "{port}"],
                   extra='start_timeout = "2s"')
    + engine_model("wrong-port", ["sh", "-c", f"exec {PY} -m http.server --bind 127.0.0.1 0", "sh", "{port}"],
                   extra='start_timeout = "2s"\nhealth = "/"')
    + engine_model("oom-at-start", ["sh", "-c", "echo 'ggml_metal_synchronize: error: command buffer 0 failed with "
                                    "status 5' >&2; kill -ABRT $$", "sh", "{port}"])
)


@pytest.fixture(scope="module")
def engines(mlx_demo_model, tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("engines"), DAEMON + MLX_ENGINE + FAKE + ON_DEMAND + PORT_TAKEN + BAD, 2) as daemon:
        yield daemon


def worker(daemon, worker_id: str) -> dict:
    return daemon.worker(worker_id)


def ready_worker(daemon, worker_id: str, timeout: float = 120) -> dict:
    return wait_for(lambda: (w := daemon.worker(worker_id))["state"] == "READY" and w, timeout, f"{worker_id} READY")


def engine_of(worker_pid: int, needle: str) -> psutil.Process:
    children = psutil.Process(worker_pid).children()
    return next(p for p in children if needle in " ".join(p.cmdline()))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # the container's init may reap late
    except psutil.NoSuchProcess:
        return True


def stream(daemon, model: str, prompt: str, timeout: float = 60, **fields):
    return list(daemon.inference().Generate(inference_pb2.GenerateRequest(model=model, prompt=prompt, **fields),
                                            timeout=timeout))


def test_mlx_lm_server_streams_through_grpc(engines):
    ready_worker(engines, "mlxe-0")
    messages = stream(engines, "mlxe", "The module", max_tokens=8, temperature=0)
    tokens, finish = messages[:-1], messages[-1].finish
    assert [m.index for m in tokens] == list(range(len(tokens))) and "".join(m.text for m in tokens)
    assert finish.reason == "length" and finish.usage.completion_tokens == 8 and finish.usage.prompt_tokens > 0
    assert finish.worker_id == "mlxe-0"
    again = stream(engines, "mlxe", "The module", max_tokens=8, temperature=0)
    assert "".join(m.text for m in again[:-1]) == "".join(m.text for m in tokens)  # greedy: the same answer

    chat = list(engines.inference().Chat(inference_pb2.ChatRequest(
        model="mlxe", messages=[inference_pb2.ChatMessage(role="user", content="hello")], max_tokens=6,
        temperature=0), timeout=60))
    assert chat[-1].finish.reason == "length" and chat[-1].finish.usage.completion_tokens == 6
    assert chat[-1].finish.usage.prompt_tokens > 1  # the engine's own template wrapped the message


def test_mlx_lm_server_through_the_openai_api(engines):
    openai = pytest.importorskip("openai")
    ready_worker(engines, "mlxe-0")
    with openai.OpenAI(base_url=engines.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        whole = client.chat.completions.create(model="mlxe", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=6, temperature=0)
        pieces = client.chat.completions.create(model="mlxe", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=6, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(pieces)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6


def test_kill_9_of_the_engine_restarts_the_worker_and_leaves_no_orphan(engines):
    before = ready_worker(engines, "mlxe-0")
    engine = engine_of(before["pid"], "mlx_lm.server")
    guard = engine_of(before["pid"], "getppid")
    engine.send_signal(signal.SIGKILL)
    after = wait_for(lambda: (w := worker(engines, "mlxe-0"))["state"] == "READY" and w["pid"] != before["pid"] and w,
                     120, "mlxe-0 restarted")
    assert "exit code 137" in after["last_exit"]
    assert gone(before["pid"]) and gone(engine.pid) and gone(guard.pid)
    log = engines.log()
    assert f"engine pid {engine.pid} ended: killed by SIGKILL; command: {PY} -m mlx_lm.server" in log
    assert stream(engines, "mlxe", "The module", max_tokens=3)[-1].finish.usage.completion_tokens == 3


def test_kill_9_of_the_worker_takes_its_engine_down(engines):
    before = ready_worker(engines, "mlxe-0")
    engine = engine_of(before["pid"], "mlx_lm.server")
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: gone(engine.pid), 5, "the engine gone with its worker")
    ready_worker(engines, "mlxe-0")


@pytest.mark.parametrize("model,words", [
    ("missing", ["engine command not found: '/nonexistent/llama-server'", "/nonexistent/llama-server --port"]),
    ("exits", ["engine exited before it was healthy (exit code 3)", "command: sh -c", "unknown model format"]),
    ("silent", ["never answered /health or /v1/models on port", "start_timeout 2s", "listening elsewhere"]),
    ("wrong-port", ["never answered / on port", "-m http.server --bind 127.0.0.1 0", "Serving HTTP on 127.0.0.1"]),
])
def test_a_bad_command_goes_fatal_naming_the_command_and_its_last_lines(engines, model, words):
    fatal = wait_for(lambda: (w := worker(engines, f"{model}-0"))["state"] == "FATAL" and w, 60, f"{model} FATAL")
    for word in words:
        assert word in fatal["reason"], fatal["reason"]


def test_an_engine_that_dies_of_metal_oom_at_start_is_oom_not_fatal(engines):
    wait_for(lambda: worker(engines, "oom-at-start-0")["state"] in ("OOM", "REFUSED"), 60, "out of memory")
    w = worker(engines, "oom-at-start-0")
    assert "out of memory" in w["last_exit"] and "llama.cpp's Metal command buffer failed" in w["last_exit"]


def test_an_engines_own_tool_calls_reach_openai_clients_as_tool_calls_whole_and_streamed(engines):
    openai = pytest.importorskip("openai")
    ready_worker(engines, "fake-0")
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    ask = dict(model="fake", messages=[{"role": "user", "content": "find mpsd"}], tools=tools, max_tokens=8)
    with openai.OpenAI(base_url=engines.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        whole = client.chat.completions.create(**ask)
        chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices]
    [call] = whole.choices[0].message.tool_calls
    assert whole.choices[0].finish_reason == "tool_calls" and call.id == "call_fake0"
    assert call.function.name == "search" and json.loads(call.function.arguments) == {"query": "find mpsd"}
    pieces = [part for c in chunks for part in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].id == "call_fake0" and pieces[0].function.name == "search"
    assert "".join(p.function.arguments or "" for p in pieces) == call.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks) and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_an_engines_http_500_prefill_failed_is_an_oom_of_that_request(engines):
    ready_worker(engines, "fake-0")
    with pytest.raises(grpc.RpcError) as failed:
        stream(engines, "fake", "please prefill-oom now")
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in failed.value.details() and "prefill failed" in failed.value.details()
    with pytest.raises(grpc.RpcError) as refused:
        stream(engines, "fake", "a bad-request here")
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens is too large" in refused.value.details()
    w = wait_for(lambda: (w := worker(engines, "fake-0")).get("oom_events") and w, 10, "the OOM counted")
    assert w["state"] == "READY"  # the worker lives
    assert stream(engines, "fake", "one two three", max_tokens=3)[-1].finish.usage.completion_tokens == 3


def test_a_hung_engine_is_killed_like_a_hung_worker(engines):
    before = ready_worker(engines, "fake-0")
    engine = engine_of(before["pid"], "fake_engine.py")
    with pytest.raises(grpc.RpcError):
        stream(engines, "fake", "now hang", timeout=1)
    after = wait_for(lambda: (w := worker(engines, "fake-0"))["state"] == "READY" and w["pid"] != before["pid"] and w,
                     60, "a replacement for the hung engine")
    assert "hung" in after["last_exit"]
    wait_for(lambda: gone(engine.pid), 5, "the hung engine gone")


def test_an_engine_aborting_with_a_metal_oom_mid_request_is_an_oom_death(engines):
    before = ready_worker(engines, "fake-0")
    with pytest.raises(grpc.RpcError) as failed:  # retried once: it waits for a worker, and none comes before memory frees
        stream(engines, "fake", "now die-oom please", timeout=5)
    assert failed.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    w = wait_for(lambda: (w := worker(engines, "fake-0"))["pid"] != before["pid"] and "out of memory" in w["last_exit"]
                 and w, 30, "an OOM death")
    assert "Metal" in w["last_exit"] and w["state"] == "OOM" and "exit code 134" in w["last_exit"]


def test_admission_refuses_the_engine_that_does_not_fit_and_kill_9_of_the_daemon_leaves_nothing(
        make_daemon, tmp_path, mlx_demo_model):
    probe = tmp_path / "memory.json"
    write_probe(probe, budget=int(2.5 * GiB))
    daemon = make_daemon(DAEMON + f'[memory]\nprobe = "file:{probe}"\n' + engine_model(
        "mlxe", [PY, "-m", "mlx_lm.server", "--model", "{path}", "--port", "{port}"], path="@mlx-demo", replicas=3,
        extra='footprint = "1GiB"\nstart_timeout = "90s"'))
    wait_for(lambda: sorted(w["state"] for w in daemon.status()["workers"]) == ["READY", "READY", "REFUSED"], 180,
             "2 READY, 1 REFUSED")
    refused = next(w for w in daemon.status()["workers"] if w["state"] == "REFUSED")
    assert refused["reason"].startswith("needs 1.0GiB, 512.0MiB free of 2.5GiB budget")
    pids = {p for w in daemon.status()["workers"] if w["pid"] for p in
            [w["pid"], *(c.pid for c in psutil.Process(w["pid"]).children(recursive=True))]}
    assert len(pids) == 6  # two workers, each with its engine and its guard
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(10)
    wait_for(lambda: all(gone(pid) for pid in pids), 10, "no worker, engine or guard left")


def test_an_engine_loads_on_a_request_and_goes_after_keep_alive_with_its_engine(engines):
    assert not [w for w in engines.status()["workers"] if w["model"] == "lazy" and w["state"] == "READY"]
    messages = stream(engines, "lazy", "one two three four", max_tokens=3)  # waits in the queue while it loads
    assert "".join(m.text for m in messages[:-1]).split() == ["one", "two", "three"]
    worker = next(w for w in engines.status()["workers"] if w["model"] == "lazy")
    engine = engine_of(worker["pid"], "fake_engine.py")
    wait_for(lambda: all(w["state"] == "STOPPED" for w in engines.status()["workers"] if w["model"] == "lazy"), 30,
             "lazy stopped after keep_alive 2s")
    wait_for(lambda: gone(engine.pid) and gone(worker["pid"]), 10, "its worker and engine gone")
    assert re.search(r"lazy-0 pid=\d+ \w+ -> \w+: stopped: idle", engines.log()), engines.log()[-1500:]


def test_a_port_taken_before_the_engine_binds_it_is_tried_again_on_another_not_fatal(engines):
    worker = ready_worker(engines, "port-taken-0", 60)
    assert worker["restarts"] == 0 and not worker["last_exit"]
    assert re.search(r"engine could not bind port \d+, taken since it was picked: trying another \(1 of 3\)",
                     engines.log())
    assert stream(engines, "port-taken", "one two three", max_tokens=2)[-1].finish.usage.completion_tokens == 2
