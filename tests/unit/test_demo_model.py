"""The demo models: one completeness check for builders and daemon, one atomic install for both builders.

The real torch build takes most of a minute, so the tests that load it use the
one build the session makes in the data directory (as `mpsd build-demo` does);
the completeness check, the locking and the install logic are checked with a
fake build step that takes no time and needs neither torch nor mlx.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from mpsd.demo import GGUF_DEMO, MLX_DEMO, TORCH_DEMO, DemoModel, gguf_model, mlx_model, torch_model
from mpsd.demo.corpus import END_OF_TEXT
from mpsd.supervisor import demo_build

DAEMON_ROOT = pathlib.Path(torch_model.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built_model(demo_model_dir: pathlib.Path) -> pathlib.Path:
    """The build `mpsd build-demo` made (the session fixture builds it if ./dev has not)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return demo_model_dir


def test_loads_through_auto_classes(built_model: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built_model)
    tokenizer = AutoTokenizer.from_pretrained(built_model)
    assert model.config.n_positions == 1024
    assert tokenizer.eos_token == END_OF_TEXT
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert TORCH_DEMO.is_complete(built_model)


def test_streamed_pieces_never_split_a_character(built_model: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    from mpsd.worker.backends.text import IncrementalDetokenizer

    tokenizer = AutoTokenizer.from_pretrained(built_model)
    text = "naïve café 🙂 ok — 東京"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()), "multi-byte characters span several tokens"
    detok = IncrementalDetokenizer(lambda chunk: tokenizer.decode(chunk, clean_up_tokenization_spaces=False))
    pieces = [detok.push(i) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


def test_tokenizer_round_trips_any_utf8(built_model: pathlib.Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built_model)
    text = "naïve café 🙂 ok"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_greedy_generation_produces_text(built_model: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(built_model)
    prompt = tokenizer("The", return_tensors="pt").input_ids
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape[1] == prompt.shape[1] + 20  # no early EOS: the corpus has none between documents
    assert any(word in tokenizer.decode(out[0]).split() for word in ("the", "a", "is", "of", "to"))


def test_second_build_returns_at_once(built_model: pathlib.Path) -> None:
    weights = built_model / "model.safetensors"
    before = weights.stat()
    lines: list[str] = []
    started = time.monotonic()
    torch_model.build_demo_model(built_model, progress=lines.append)
    assert time.monotonic() - started < 2.0
    assert lines == []
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_cli_on_complete_dir_exits_zero_offline(built_model: pathlib.Path) -> None:
    result = _run_cli(TORCH_DEMO, built_model)
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- the one completeness check


@pytest.fixture(params=[TORCH_DEMO, MLX_DEMO, GGUF_DEMO], ids=["torch", "mlx", "gguf"])
def demo(request: pytest.FixtureRequest) -> DemoModel:
    return request.param


def _write_model(directory: pathlib.Path, demo: DemoModel) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name in demo.model_files:
        (directory / name).write_text("{}")
    demo.write_marker(directory, {})
    return directory


def test_a_whole_model_at_this_version_is_complete(tmp_path: pathlib.Path, demo: DemoModel) -> None:
    assert demo.is_complete(_write_model(tmp_path / "model", demo))


def test_a_stale_marker_version_is_not_complete(tmp_path: pathlib.Path, demo: DemoModel) -> None:
    model_dir = _write_model(tmp_path / "model", demo)
    (model_dir / demo.marker_file).write_text(json.dumps({"version": demo.marker_version - 1}))
    assert not demo.is_complete(model_dir)


def test_a_missing_marker_or_model_file_is_not_complete(tmp_path: pathlib.Path, demo: DemoModel) -> None:
    no_marker = _write_model(tmp_path / "marker", demo)
    (no_marker / demo.marker_file).unlink()
    assert not demo.is_complete(no_marker)
    for name in demo.model_files:
        no_file = _write_model(tmp_path / name, demo)
        (no_file / name).unlink()
        assert not demo.is_complete(no_file), f"complete without {name}"


def test_the_daemon_rebuilds_a_stale_version_instead_of_serving_it(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[str] = []

    async def fake_builder(demo: DemoModel, builder_args: list[str], env: dict[str, str]) -> None:
        built.append(demo.ref)
        _write_model(pathlib.Path(builder_args[0]), demo)

    monkeypatch.setattr(demo_build, "_run_builder", fake_builder)
    _write_model(TORCH_DEMO.model_dir(tmp_path), TORCH_DEMO)
    stale = _write_model(MLX_DEMO.model_dir(tmp_path), MLX_DEMO)
    (stale / MLX_DEMO.marker_file).write_text(json.dumps({"version": MLX_DEMO.marker_version - 1}))
    asyncio.run(demo_build.ensure_demos([TORCH_DEMO.ref, MLX_DEMO.ref], tmp_path, {}))
    assert built == [MLX_DEMO.ref]
    assert MLX_DEMO.is_complete(stale)


# ---------------------------------------------------------------- the shared install, for both builders


@dataclasses.dataclass(frozen=True)
class Builder:
    demo: DemoModel
    module: object
    build: Callable[[pathlib.Path, Callable[[str], None]], pathlib.Path]


BUILDERS = [
    Builder(TORCH_DEMO, torch_model, lambda out, progress: torch_model.build_demo_model(out, progress=progress)),
    Builder(MLX_DEMO, mlx_model,
            lambda out, progress: mlx_model.build_mlx_demo_model(out, progress=progress, tokenizer_dir=out.parent)),
    Builder(GGUF_DEMO, gguf_model, lambda out, progress: gguf_model.build_gguf_demo_model(
        out, progress=progress, source_dir=out.parent, cache_dir=out.parent / "cache")),
]


@pytest.fixture(params=BUILDERS, ids=["torch", "mlx", "gguf"])
def builder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Builder:
    """A builder whose build step is fake: it takes no time and needs neither torch, mlx nor llama.cpp's converter."""
    demo = request.param.demo

    def fake_build_into(staging: pathlib.Path, *args: object) -> None:
        time.sleep(0.2)  # long enough for a concurrent builder to arrive while this one holds the lock
        _write_model(staging, demo)
        args[-1]("built")

    monkeypatch.setattr(request.param.module, "_build_into", fake_build_into)
    return request.param


def test_concurrent_builders_build_once(tmp_path: pathlib.Path, builder: Builder) -> None:
    out_dir = tmp_path / "model"
    lines: list[str] = []
    threads = [threading.Thread(target=builder.build, args=(out_dir, lines.append)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lines.count("built") == 1
    assert builder.demo.is_complete(out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_failed_build_leaves_nothing(tmp_path: pathlib.Path, builder: Builder, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(staging: pathlib.Path, *args: object) -> None:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(builder.module, "_build_into", crash)
    with pytest.raises(RuntimeError, match="out of disk"):
        builder.build(tmp_path / "model", lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]


def test_stale_staging_and_old_version_are_replaced(tmp_path: pathlib.Path, builder: Builder) -> None:
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / builder.demo.marker_file).write_text(json.dumps({"version": 0}))
    stale = tmp_path / ".model.mpsd-build-abcd1234"
    stale.mkdir()
    other_models_staging = tmp_path / ".other.mpsd-build-abcd1234"
    other_models_staging.mkdir()
    builder.build(out_dir, lambda line: None)
    assert builder.demo.is_complete(out_dir)
    assert not stale.exists() and other_models_staging.exists()


def test_cli_refuses_foreign_dir_in_one_line(tmp_path: pathlib.Path, demo: DemoModel) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = _run_cli(demo, tmp_path)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"holds something other than the {demo.label}" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _run_cli(demo: DemoModel, out_dir: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(DAEMON_ROOT))
    return subprocess.run(
        [sys.executable, "-m", demo.builder_module, str(out_dir)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
