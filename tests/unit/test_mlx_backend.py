"""The mlx-lm backend on a tiny random-weight MLX model (the MLX CPU backend on Linux), through the decode loop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("mlx_lm")

import mlx.core as mx  # noqa: E402

from mpsd.demo import MLX_DEMO  # noqa: E402
from mpsd.demo.mlx_model import build_mlx_demo_model  # noqa: E402
from mpsd.worker.backends.base import BootFailure, InvalidRequest, TokenEvent  # noqa: E402
from mpsd.worker.backends.mlx_lm import MlxCausalLM  # noqa: E402
from mpsd.worker_spec import WorkerSpec  # noqa: E402

from decoding import params, run, running, together, token_ids  # noqa: E402


@pytest.fixture(scope="module")
def mlx_model_dir(demo_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("mlx") / "mlx-demo"
    build_mlx_demo_model(out, progress=lambda _line: None, tokenizer_dir=demo_model)
    return out


@pytest.fixture(scope="module")
def engine(mlx_model_dir):
    return MlxCausalLM(str(mlx_model_dir), None, None, None, max_sequences=8)


@pytest.fixture(scope="module")
def model(engine):
    """The decode loop over the engine: what a worker runs."""
    with running(engine, 8) as scheduler:
        yield scheduler


def test_demo_model_is_complete_and_loads_with_mlx_lm(mlx_model_dir):
    import mlx_lm

    assert MLX_DEMO.is_complete(mlx_model_dir)
    marker = json.loads((mlx_model_dir / "mpsd-mlx-demo.json").read_text())
    assert marker["kind"] == "mpsd-mlx-demo-llama"
    loaded, tokenizer = mlx_lm.load(str(mlx_model_dir))
    assert tokenizer.encode("Hello", add_special_tokens=False)


def test_device_context_and_kv_size(engine):
    assert engine.device in ("mlx-cpu", "mlx-metal")
    assert engine.context_length == 256
    assert engine.kv_bytes_per_token > 0


def test_greedy_is_deterministic_and_counts_tokens(model):
    first, done = run(model, params(max_tokens=20))
    second, _ = run(model, params(max_tokens=20))
    assert [e.token_id for e in first] == [e.token_id for e in second]
    assert [e.index for e in first] == list(range(len(first)))
    if done.reason == "length":
        assert done.completion_tokens == 20 == len(first)
    assert done.prompt_tokens == len(model._engine.encode("Hello world"))


def test_seed_reproduces_sampling_and_differs_between_seeds(model):
    a, _ = run(model, params(max_tokens=30, temperature=1.0, top_p=0.95, seed=123))
    b, _ = run(model, params(max_tokens=30, temperature=1.0, top_p=0.95, seed=123))
    c, _ = run(model, params(max_tokens=30, temperature=1.0, top_p=0.95, seed=124))
    assert [e.token_id for e in a] == [e.token_id for e in b]
    assert [e.token_id for e in a] != [e.token_id for e in c]


def test_greedy_and_seeded_requests_give_the_same_tokens_batched_as_alone(model):
    """Per-request PRNG keys: mlx_lm.server runs a seeded request alone; here it shares the batch."""
    requests = [params("Hello", 24), params("The module provides a way to", 24, temperature=0.8, top_p=0.9, seed=7),
                params("Return the number of items in the sequence", 24), params("Hello", 24, temperature=1.0, seed=9)]
    alone = [token_ids(run(model, request)[0]) for request in requests]
    batched = [token_ids(client.events) for client in together(model, requests, stagger_s=0.005)]
    assert batched == alone
    assert max(record.decode_rows for record in model.steps) > 1, "the requests really shared steps"


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
    assert "".join(e.text for e in events) == model._engine.decode(ids)


def test_prompt_too_long_is_invalid(model):
    with pytest.raises(InvalidRequest, match=r"^prompt: "):
        list(model.submit(params(prompt="hello " * 400)))


def test_max_tokens_above_context_is_invalid(model):
    with pytest.raises(InvalidRequest, match=r"^max_tokens: "):
        list(model.submit(params(max_tokens=10_000)))


def test_a_cancelled_request_ends_without_finished_and_leaves_the_batch(model):
    submission = model.submit(params(max_tokens=200))
    first = next(iter(submission))
    submission.cancel()
    rest = list(submission)  # what was already on its way, then the end: no Finished
    assert first.index == 0 and len(rest) < 199 and all(isinstance(e, TokenEvent) for e in rest)
    run(model, params(max_tokens=3))  # the loop goes on
    assert model.running == 0


def test_memory_report(engine):
    report = engine.memory_report()
    for key in ("mlx_active", "mlx_peak", "mlx_cache"):
        assert isinstance(report.bytes_by_kind[key], int) and report.bytes_by_kind[key] >= 0
    assert report.bytes_by_kind["mlx_active"] > 0
    if engine.device == "mlx-cpu":
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
        "from mpsd.worker.__main__ import _load, _start_decoding\n"
        "from mpsd.worker_spec import WorkerSpec\n"
        f"spec = WorkerSpec.from_json({spec.to_json()!r})\n"
        "m = _load(spec)\n"
        "_start_decoding(spec, m).stop()\n"
        "print(m.device, 'mpsd.worker.device' in sys.modules or 'mpsd.worker.backends.sampling' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    device, mpsd_torch_code_loaded = result.stdout.split()
    assert device in ("mlx-cpu", "mlx-metal")
    assert mpsd_torch_code_loaded == "False"
