"""The demo model must load offline through the stock Auto* classes, and building must be atomic and idempotent.

The real build takes most of a minute, so these tests use the one build the
session makes in the data directory (as `mpsd build-demo` does); the locking
and install logic is checked separately with a fake builder that takes no time.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from mpsd.worker import demo_model  # noqa: E402

DAEMON_ROOT = pathlib.Path(demo_model.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built_model(demo_model_dir: pathlib.Path) -> pathlib.Path:
    """The build `mpsd build-demo` made (the session fixture builds it if ./dev has not)."""
    return demo_model_dir


def test_loads_through_auto_classes(built_model: pathlib.Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(built_model)
    tokenizer = AutoTokenizer.from_pretrained(built_model)
    assert model.config.n_positions == 1024
    assert tokenizer.eos_token == demo_model.END_OF_TEXT
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert (built_model / "model.safetensors").is_file()
    assert json.loads((built_model / demo_model.MARKER_FILE).read_text())["version"] == demo_model.MARKER_VERSION


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
    demo_model.build_demo_model(built_model, progress=lines.append)
    assert time.monotonic() - started < 2.0
    assert lines == []
    after = weights.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_cli_on_complete_dir_exits_zero_offline(built_model: pathlib.Path) -> None:
    result = _run_cli(str(built_model))
    assert result.returncode == 0, result.stderr


def test_cli_refuses_foreign_dir_in_one_line(tmp_path: pathlib.Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = _run_cli(str(tmp_path))
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1
    assert "not a demo model" in result.stderr
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- install logic, with a fake builder


def _fake_build(staging: pathlib.Path, spec: demo_model.DemoSpec, progress) -> None:
    time.sleep(0.2)  # long enough for a concurrent builder to arrive while this one holds the lock
    for name in demo_model.REQUIRED_FILES:
        (staging / name).write_text("{}")
    (staging / demo_model.MARKER_FILE).write_text(json.dumps({"version": demo_model.MARKER_VERSION}))
    progress("built")


def test_concurrent_builders_build_once(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "_build_into", _fake_build)
    out_dir = tmp_path / "model"
    lines: list[str] = []
    threads = [threading.Thread(target=demo_model.build_demo_model, args=(out_dir,), kwargs={"progress": lines.append})
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert lines.count("built") == 1
    assert demo_model.is_demo_model_complete(out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_failed_build_leaves_nothing(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(staging: pathlib.Path, spec: demo_model.DemoSpec, progress) -> None:
        (staging / "config.json").write_text("{}")
        raise RuntimeError("out of disk")

    monkeypatch.setattr(demo_model, "_build_into", crash)
    out_dir = tmp_path / "model"
    with pytest.raises(RuntimeError, match="out of disk"):
        demo_model.build_demo_model(out_dir, progress=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock"]


def test_stale_staging_and_old_version_are_replaced(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_model, "_build_into", _fake_build)
    out_dir = tmp_path / "model"
    out_dir.mkdir()
    (out_dir / demo_model.MARKER_FILE).write_text(json.dumps({"version": 0}))
    stale = tmp_path / ".model.mpsd-build-abcd1234"
    stale.mkdir()
    assert not demo_model.is_demo_model_complete(out_dir)
    demo_model.build_demo_model(out_dir, progress=lambda line: None)
    assert demo_model.is_demo_model_complete(out_dir)
    assert not stale.exists()


def _run_cli(out_dir: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(DAEMON_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "mpsd.worker.demo_model", out_dir],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
