"""The GGUF demo model ('@gguf-demo'): what its reference means, when a build is complete, and a real conversion.

The completeness check, the locking and the install are shared with the other
demos and tested with them (test_demo_model.py, the "gguf" cases); here are
the GGUF builder's own parts. The real conversion (llama.cpp's converter, a
few seconds) runs only where the converter is already in the data directory's
cache (`./dev llama-cpp` or `mpsd build-demo --gguf` fetches it), so the suite
never downloads anything; loading the file runs only where the llama-cpp extra
is installed.
"""

from __future__ import annotations

import io
import json
import pathlib
import tarfile
import time

import pytest
from mpsd import paths
from mpsd.demo import DEMO_MODELS, GGUF_DEMO, TORCH_DEMO, DemoModelError, gguf_model, resolve_demo_ref
from mpsd.demo.chat_template import DEMO_CHAT_TEMPLATE
from mpsd.demo.models import GGUF_DEMO_FILE
from support import data_dir


def test_the_reference_means_the_gguf_file_and_the_others_their_directories(tmp_path: pathlib.Path) -> None:
    gguf = resolve_demo_ref(paths.GGUF_DEMO_MODEL_REF, tmp_path)
    assert gguf == str(tmp_path / "models" / "demo-gpt2-gguf" / GGUF_DEMO_FILE) and gguf.endswith(".gguf")
    assert resolve_demo_ref(paths.DEMO_MODEL_REF, tmp_path) == str(paths.demo_model_dir(tmp_path))
    assert resolve_demo_ref("/models/mine.gguf", tmp_path) == "/models/mine.gguf"
    assert set(paths.DEMO_MODEL_REFS) == set(DEMO_MODELS)


def test_complete_is_the_file_and_the_marker_at_this_version(tmp_path: pathlib.Path) -> None:
    model_dir = GGUF_DEMO.model_dir(tmp_path)
    model_dir.mkdir(parents=True)
    (model_dir / GGUF_DEMO_FILE).write_bytes(b"GGUF")
    assert not GGUF_DEMO.is_complete(model_dir), "no marker: a build that did not finish"
    GGUF_DEMO.write_marker(model_dir, {})
    assert GGUF_DEMO.is_complete(model_dir), "no Hugging Face files needed"
    assert not TORCH_DEMO.is_complete(model_dir)
    (model_dir / GGUF_DEMO.marker_file).write_text(json.dumps({"version": GGUF_DEMO.marker_version + 1}))
    assert not GGUF_DEMO.is_complete(model_dir)


def test_refuses_an_incomplete_torch_demo_before_fetching_anything(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DemoModelError, match="no complete demo model"):
        gguf_model.build_gguf_demo_model(tmp_path / "out", source_dir=tmp_path / "none", cache_dir=tmp_path / "cache",
                                         progress=lambda line: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]


def test_the_converter_is_extracted_once_and_only_its_parts(tmp_path: pathlib.Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    downloads: list[pathlib.Path] = []

    def fake_download(dest: pathlib.Path, python: str) -> pathlib.Path:
        downloads.append(dest)
        archive = dest / f"llama_cpp_python-{gguf_model.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        prefix = f"llama_cpp_python-{gguf_model.LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(archive, "w:gz") as tar:
            for name in ("convert_hf_to_gguf.py", "conversion/base.py", "gguf-py/gguf/__init__.py", "CMakeLists.txt"):
                info = tarfile.TarInfo(prefix + name)
                info.size = 1
                tar.addfile(info, io.BytesIO(b"#"))
        return archive

    monkeypatch.setattr(gguf_model, "_download_sdist", fake_download)
    root = gguf_model.ensure_converter(tmp_path, lambda line: None)
    assert gguf_model.ensure_converter(tmp_path, lambda line: None) == root
    assert len(downloads) == 1 and not downloads[0].exists()
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "conversion/base.py", "convert_hf_to_gguf.py", "gguf-py/gguf/__init__.py"]


# ---------------------------------------------------------------- the real converter, where it is cached


@pytest.fixture(scope="module")
def built_gguf(demo_model_dir: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    cache = paths.cache_dir(data_dir())
    problem = gguf_model.converter_problem(cache)
    if problem:
        pytest.skip(problem)
    out_dir = tmp_path_factory.mktemp("gguf") / "demo-gpt2-gguf"
    return gguf_model.build_gguf_demo_model(out_dir, source_dir=demo_model_dir, cache_dir=cache,
                                            progress=lambda line: None)


def test_the_converter_writes_a_complete_gguf_of_the_torch_demo(built_gguf: pathlib.Path,
                                                                demo_model_dir: pathlib.Path) -> None:
    assert GGUF_DEMO.is_complete(built_gguf)
    header = gguf_model.read_header(built_gguf / GGUF_DEMO_FILE)
    marker = GGUF_DEMO.read_marker(built_gguf)
    assert marker["gguf"]["tensors"] == header["tensors"] > 0 and marker["outtype"] == "f32"
    assert marker["source"]["weights_sha256"] == gguf_model._sha256(demo_model_dir / "model.safetensors")
    lines: list[str] = []
    started = time.monotonic()
    gguf_model.build_gguf_demo_model(built_gguf, source_dir=demo_model_dir, cache_dir=built_gguf.parent / "unused",
                                     progress=lines.append)
    assert time.monotonic() - started < 1.0 and lines == [], "a complete build is not converted again"


def test_llama_cpp_loads_it_with_the_demo_tokenizer_and_chat_template(built_gguf: pathlib.Path,
                                                                       demo_model_dir: pathlib.Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llama-cpp extra is not installed (./dev llama-cpp)")
    from tokenizers import Tokenizer

    llm = llama_cpp.Llama(str(built_gguf / GGUF_DEMO_FILE), n_ctx=128, n_threads=1, verbose=False)
    text = "The module provides naïve café"
    expected = Tokenizer.from_file(str(demo_model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert llm.tokenize(text.encode(), add_bos=False) == expected
    assert llm.metadata["tokenizer.chat_template"] == DEMO_CHAT_TEMPLATE
    out = llm.create_completion("The module provides", max_tokens=4, temperature=0.0)
    assert 1 <= out["usage"]["completion_tokens"] <= 4 and out["choices"][0]["text"]
