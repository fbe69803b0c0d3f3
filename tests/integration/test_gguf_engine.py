"""A GGUF file served by llama.cpp under mpsd: `path = "@gguf-demo"` with no backend, two replicas, one weights file.

Opt-in: llama-cpp-python is built from its source distribution (minutes), so
it is not part of `./dev setup`; `./dev llama-cpp` installs it and writes the
GGUF demo model, and this module skips with that hint elsewhere. With it,
everything here is real: mpsd's daemon, its workers, llama-cpp-python's
server (`python -m llama_cpp.server`, what a GGUF path picks where llama-server
is not on PATH) on real sockets, and the demo GPT-2 converted to GGUF by
llama.cpp's own converter.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

from mpsd import paths
from mpsd.demo.models import GGUF_DEMO_FILE
from mpsd.v1 import inference_pb2
from support import data_dir, running_daemon, wait_for

pytest.importorskip("llama_cpp", reason="the llama-cpp extra is not installed (./dev llama-cpp builds it: minutes)")

CONFIG = """
[daemon]
health_interval = "0.3s"

[[models]]
name = "gguf"
path = "@gguf-demo"
replicas = 2
env = { OMP_NUM_THREADS = "1" }
"""


@pytest.fixture(scope="module")
def gguf_file(demo_model) -> pathlib.Path:
    """The GGUF demo model, built the way `./dev llama-cpp` does (a no-op when it is complete)."""
    subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "build-demo", "--gguf", "--data-dir", str(data_dir())],
                   check=True, timeout=600)
    return paths.gguf_demo_model_dir(data_dir()) / GGUF_DEMO_FILE


@pytest.fixture(scope="module")
def gguf(gguf_file, tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("gguf"), CONFIG, 2) as daemon:
        yield daemon


def generate(daemon, prompt: str, **fields) -> tuple[str, inference_pb2.Finish]:
    messages = list(daemon.inference().Generate(inference_pb2.GenerateRequest(model="gguf", prompt=prompt, **fields),
                                                timeout=60))
    assert [m.index for m in messages[:-1]] == list(range(len(messages) - 1))
    return "".join(m.text for m in messages[:-1]), messages[-1].finish


def test_a_gguf_path_with_no_backend_runs_llama_cpp_as_an_engine(gguf):
    workers = gguf.status()["workers"]
    assert sorted(w["state"] for w in workers) == ["READY", "READY"]
    assert all(w["device"] == "engine llama_cpp.server" for w in workers), [w["device"] for w in workers]
    assert "starting engine on port" in gguf.log() and "-m llama_cpp.server --model " in gguf.log()


def test_generate_streams_greedy_and_carries_max_tokens_and_stop(gguf):
    text, finish = generate(gguf, "The module provides", max_tokens=12, temperature=0)
    assert finish.reason == "length" and finish.usage.completion_tokens == 12 and finish.usage.prompt_tokens == 3
    assert text and generate(gguf, "The module provides", max_tokens=12, temperature=0)[0] == text  # greedy
    word = next(w for w in text.split() if len(w) > 2)
    cut, finish = generate(gguf, "The module provides", max_tokens=12, temperature=0, stop=[word])
    assert finish.reason == "stop" and word not in cut and text.startswith(cut), (text, cut)


def test_chat_through_the_openai_api_uses_the_gguf_chat_template(gguf):
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=gguf.http_url, api_key="unused", max_retries=0, timeout=60) as client:
        whole = client.chat.completions.create(model="gguf", messages=[{"role": "user", "content": "hello"}],
                                               max_tokens=6, temperature=0)
        chunks = list(client.chat.completions.create(
            model="gguf", messages=[{"role": "user", "content": "hello"}], max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}))
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 6
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6
    # The engine rendered the GGUF's template (the demo's, carried in its metadata): the same prompt written out
    # by hand gives the same greedy answer. (llama-cpp-python streams no usage, so a chat's prompt_tokens is 0.)
    rendered, finish = generate(gguf, "user: hello<|endoftext|>assistant:", max_tokens=6, temperature=0)
    assert rendered == whole.choices[0].message.content
    assert finish.usage.prompt_tokens == 11  # counted by the engine's tokenizer (its own non-streamed usage says 11)


def test_two_replicas_share_the_mapped_weights_and_each_is_counted_without_them(gguf, gguf_file):
    generate(gguf, "The module provides", max_tokens=4)  # both have touched their weights by now (warm-up and this)
    size = gguf_file.stat().st_size
    model = next(m for m in gguf.status()["models"] if m["name"] == "gguf")
    workers = [w for w in gguf.status()["workers"] if w["model"] == "gguf"]
    figures = {w["id"]: {k: int(v) for k, v in w["process_memory"].items()} for w in workers}
    print(f"GGUF file {size / 2**20:.1f} MiB; per worker (bytes): {figures}; model shared {model['shared_bytes']} "
          f"by {model['shared_by']}")
    assert model["shared_by"] == 2 and model["shared_bytes"] >= size // 2
    for memory in figures.values():
        assert memory["processes"] == 3  # the worker, its guard and llama_cpp.server
        assert memory["clean_bytes"] >= size // 2  # the mapped weights are resident, clean
        assert memory["footprint_bytes"] < memory["rss_bytes"] - size // 2  # ... and not in the footprint
        assert memory["pss_bytes"] < memory["rss_bytes"] - size // 4  # each is charged half of the shared pages
    assert all(int(w["memory_bytes"]) == figures[w["id"]]["footprint_bytes"] for w in workers)


def test_the_engine_dies_with_its_worker(gguf):
    import psutil

    worker = gguf.worker("gguf-0")
    engine = next(p for p in psutil.Process(worker["pid"]).children() if "llama_cpp.server" in " ".join(p.cmdline()))
    os.kill(worker["pid"], 9)
    wait_for(lambda: not engine.is_running() or engine.status() == psutil.STATUS_ZOMBIE, 5, "the engine gone")
    wait_for(lambda: (w := gguf.worker("gguf-0"))["state"] == "READY" and w["pid"] != worker["pid"], 60,
             "gguf-0 back")
