"""The committed generated code must be exactly what the .proto files produce."""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_generator():
    spec = importlib.util.spec_from_file_location("proto_generate", ROOT / "proto" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto_files(tmp_path):
    pytest.importorskip("grpc_tools")
    generator = load_generator()
    generator.generate(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*") if p.is_file())
    assert fresh, "protoc produced nothing"
    for relative in fresh:
        committed = ROOT / "daemon" / relative
        assert committed.exists(), f"{relative} is not committed: run python proto/generate.py"
        assert committed.read_bytes() == (tmp_path / relative).read_bytes(), f"{relative} is stale: run python proto/generate.py"
