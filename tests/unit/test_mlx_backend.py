"""The mlx-lm backend on a tiny random-weight MLX model (the MLX CPU backend on Linux)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402

from mpsd.demo import MLX_DEMO  # noqa: E402
from mpsd.demo.mlx_model import build_mlx_demo_model  # noqa: E402
from mpsd.worker.backends.base import BootFailure, Finished, GenerateParams, InvalidRequest, TokenEvent  # noqa: E402
from mpsd.worker.backends.mlx_lm import MlxCausalLM  # noqa: E402
from mpsd.worker_spec import WorkerSpec  # noqa: E402


@pytest.fixture(scope="module")
def mlx_model_dir(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx") / "mlx-demo"
    build_mlx_demo_model(out, progress=lambda _line: None, tokenizer_dir=demo_model)
    return out


@pytest.fixture(scope="module")
def model(mlx_model_dir):
    model = MlxCausalLM(str(mlx_model_dir), None, None, None)
    model.warm_up()
    return model


def params(prompt="Hello world", max_tokens=16, temperature=0.0, top_p=1.0, seed=None, stop=()):
    return GenerateParams(prompt, max_tokens, temperature, top_p, seed, tuple(stop))


def run(model, p):
    events = list(model.generate(p, lambda: True))
    assert all(isinstance(e, TokenEvent) for e in events[:-1])
    assert isinstance(events[-1], Finished)
    return events[:-1], events[-1]


def test_demo_model_is_complete_and_loads_with_mlx_lm(mlx_model_dir):
    import mlx_lm

    assert MLX_DEMO.is_complete(mlx_model_dir)
    marker = json.loads((mlx_model_dir / "mpsd-mlx-demo.json").read_text())
    assert marker["kind"] == "mpsd-mlx-demo-llama"
    loaded, tokenizer = mlx_lm.load(str(mlx_model_dir))
    assert tokenizer.encode("Hello", add_special_tokens=False)


def test_device_and_context(model):
    assert model.device in ("mlx-cpu", "mlx-metal")
    assert model.context_length == 256


def test_greedy_is_deterministic_and_counts_tokens(model):
    first, done = run(model, params(max_tokens=20))
    second, _ = run(model, params(max_tokens=20))
    assert [e.token_id for e in first] == [e.token_id for e in second]
    assert [e.index for e in first] == list(range(len(first)))
    if done.reason == "length":
        assert done.completion_tokens == 20 == len(first)
    assert done.prompt_tokens == len(model._tokenizer.encode("Hello world", add_special_tokens=False))


def test_seed_reproduces_sampling_and_differs_between_seeds(model):
    a, _ = run(model, params(max_tokens=30, temperature=1.0, top_p=0.95, seed=123))
    b, _ = run(model, params(max_tokens=30, temperature=1.0, top_p=0.95, seed=123))
    c, _ = run(model, params(max_tokens=30, temperature=1.0, top_p=0.95, seed=124))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert [e.token_id for e in a] != [e.token_id for e in c]


def test_seeded_request_is_unaffected_by_an_interleaved_request(model):
    alone, _ = run(model, params(max_tokens=12, temperature=1.0, seed=5))
    seeded = model.generate(params(max_tokens=12, temperature=1.0, seed=5), lambda: True)
    other = model.generate(params(max_tokens=12, temperature=1.0, seed=None), lambda: True)
    interleaved = []
    for event, _ in zip(seeded, other):
        interleaved.append(event)
    interleaved.extend(seeded)
    assert [e.token_id for e in interleaved if isinstance(e, TokenEvent)] == [e.token_id for e in alone]


def test_max_tokens_gives_length(model):
    events, done = run(model, params(max_tokens=5))
    assert done.reason == "length" and done.completion_tokens == 5 and len(events) == 5


def test_stop_sequence_cuts_the_text(model):
    full, _ = run(model, params(max_tokens=24))
    text = "".join(e.text for e in full)
    assert len(text) > 6
    stop = text[3:6]
    events, done = run(model, params(max_tokens=24, stop=[stop]))
    assert done.reason == "stop"
    assert "".join(e.text for e in events) == text[: text.find(stop)]


def test_text_round_trips_through_the_tokenizer(model):
    events, _ = run(model, params(max_tokens=24))
    ids = [e.token_id for e in events]
    assert "".join(e.text for e in events) == model._decode(ids)


def test_prompt_too_long_is_invalid(model):
    with pytest.raises(InvalidRequest, match=r"^prompt: "):
        list(model.generate(params(prompt="hello " * 400), lambda: True))


def test_max_tokens_above_context_is_invalid(model):
    with pytest.raises(InvalidRequest, match=r"^max_tokens: "):
        list(model.generate(params(max_tokens=10_000), lambda: True))


def test_keep_going_false_stops_without_finished(model):
    assert list(model.generate(params(max_tokens=10), lambda: False)) == []


def test_memory_report(model):
    report = model.memory_report()
    for key in ("mlx_active", "mlx_peak", "mlx_cache"):
        assert isinstance(report.bytes_by_kind[key], int) and report.bytes_by_kind[key] >= 0
    assert report.bytes_by_kind["mlx_active"] > 0
    if model.device == "mlx-cpu":
        assert "Metal" in report.note
        assert "mlx_max_recommended_working_set" not in report.bytes_by_kind
    else:
        assert report.bytes_by_kind["mlx_max_recommended_working_set"] > 0


def test_limits_are_applied(mlx_model_dir):
    memory_before = mx.get_memory_limit()
    cache_before = mx.set_cache_limit(0)
    mx.set_cache_limit(cache_before)
    try:
        MlxCausalLM(str(mlx_model_dir), 3 * 2**30, 2**20, 2**24)
        assert mx.get_memory_limit() == 3 * 2**30
        assert mx.set_cache_limit(cache_before) == 2**24
    finally:
        mx.set_memory_limit(memory_before)
        mx.set_cache_limit(cache_before)
        mx.set_wired_limit(0)


def test_invalid_limit_is_a_boot_failure(mlx_model_dir):
    with pytest.raises(BootFailure, match="memory_limit"):
        MlxCausalLM(str(mlx_model_dir), -1, None, None)


def test_missing_directory_is_a_boot_failure(tmp_path):
    with pytest.raises(BootFailure, match="config.json"):
        MlxCausalLM(str(tmp_path / "nowhere"), None, None, None)


def test_invalid_directory_is_a_boot_failure(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BootFailure, match="cannot load"):
        MlxCausalLM(str(tmp_path), None, None, None)


def test_worker_load_takes_the_mlx_branch_before_torch(mlx_model_dir):
    """mpsd's own torch code stays out of an mlx worker.

    torch itself still arrives when it is installed in the same environment:
    mlx_lm.tokenizer_utils imports transformers, and transformers 5 imports
    torch whenever it is installed (it has no switch to stop that).
    """
    spec = WorkerSpec(worker_id="m-0", socket="/tmp/m-0.sock", backend="mlx-lm", parent_pid=1,
                      path=str(mlx_model_dir), mlx_memory_limit=2**30, mlx_cache_limit=2**20)
    code = (
        "import sys\n"
        "from mpsd.worker.__main__ import _load\n"
        "from mpsd.worker_spec import WorkerSpec\n"
        f"m = _load(WorkerSpec.from_json({spec.to_json()!r}))\n"
        "m.warm_up()\n"
        "print(m.device, 'mpsd.worker.device' in sys.modules or 'mpsd.worker.backends.sampling' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    device, mpsd_torch_code_loaded = result.stdout.split()
    assert device in ("mlx-cpu", "mlx-metal")
    assert mpsd_torch_code_loaded == "False"
