"""MLX workers through the real daemon: two mlx-lm workers streaming, beside a torch model, memory in status."""

import threading

import pytest

from mpsd.v1 import inference_pb2
from support import DEMO_ONE_WORKER

SIDE_BY_SIDE = DEMO_ONE_WORKER + """
[[models]]
name = "mlx"
backend = "mlx-lm"
path = "@mlx-demo"
replicas = 2
memory_limit = "2GiB"
cache_limit = "64MiB"
"""


@pytest.fixture(scope="module")
def mlx_daemon(mlx_demo_model, tmp_path_factory):
    from support import running_daemon

    with running_daemon(tmp_path_factory.mktemp("mlx"), SIDE_BY_SIDE, 3) as daemon:
        yield daemon


def text_and_finish(messages):
    assert messages[-1].HasField("finish")
    return "".join(m.text for m in messages[:-1]), messages[-1].finish


def test_two_mlx_workers_stream_concurrently(mlx_daemon):
    finishes = []
    barrier = threading.Barrier(2, timeout=60)

    def stream():
        call = mlx_daemon.inference().Generate(
            inference_pb2.GenerateRequest(model="mlx", prompt="The module", max_tokens=40, temperature=0), timeout=60)
        first = next(call)
        barrier.wait()
        rest = list(call)
        finishes.append(rest[-1].finish)
        assert [m.index for m in [first] + rest[:-1]] == list(range(len(rest)))

    threads = [threading.Thread(target=stream) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(finishes) == 2 and len({f.worker_pid for f in finishes}) == 2
    assert all(f.usage.completion_tokens == 40 and f.reason == "length" for f in finishes)


def test_torch_and_mlx_models_side_by_side(mlx_daemon):
    torch_text, torch_finish = text_and_finish(mlx_daemon.generate("The module", model="demo", max_tokens=10, temperature=0))
    mlx_text, mlx_finish = text_and_finish(mlx_daemon.generate("The module", model="mlx", max_tokens=10, temperature=0))
    assert torch_text and mlx_text
    assert torch_finish.worker_id.startswith("demo-") and mlx_finish.worker_id.startswith("mlx-")
    again, _ = text_and_finish(mlx_daemon.generate("The module", model="mlx", max_tokens=10, temperature=0))
    assert again == mlx_text, "greedy MLX decoding is deterministic"


def test_mlx_memory_figures_in_status(mlx_daemon):
    mlx_daemon.generate("The", model="mlx", max_tokens=5)
    status = mlx_daemon.status()
    workers = [w for w in status["workers"] if w["model"] == "mlx"]
    for worker in workers:
        assert worker["device"] == "mlx-cpu"
        assert {"mlx_active", "mlx_peak", "mlx_cache"} <= set(worker["backend_memory"])
        assert worker["backend_memory"]["mlx_peak"] > 0
        assert "Metal" in worker["backend_memory_note"] or "metal" in worker["backend_memory_note"]
        assert worker["memory_bytes"] > 0
    model = next(m for m in status["models"] if m["name"] == "mlx")
    assert model["backend"] == "mlx-lm" and model["footprint_source"] == "learned"


def test_the_mlx_demo_chats_through_its_template(mlx_daemon):
    from mpsd.client import Client

    with Client(mlx_daemon.address) as client:
        chat = client.chat([{"role": "user", "content": "Hi"}], "mlx", max_tokens=10, temperature=0)
        text = chat.text()
        generated = client.generate("user: Hi<|endoftext|>assistant:", "mlx", max_tokens=10, temperature=0).text()
    assert text == generated and chat.finish.worker_id.startswith("mlx-")
