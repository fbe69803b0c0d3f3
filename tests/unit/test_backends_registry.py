"""The one backend registry: config accepts exactly its names, and every loader it names exists."""

import ast
import importlib.util
import pathlib

import pytest

from mpsd.backends import BACKENDS
from mpsd.config import ConfigError, parse_config
from mpsd.worker.__main__ import _load
from mpsd.worker.backends.base import BootFailure
from mpsd.worker_spec import WorkerSpec

REGISTERED = list(BACKENDS.values())


def parse_model(backend, extra: str = ""):
    lines = ["name = 'a'", f"backend = '{backend.name}'", extra]
    lines += ["path = 'x'"] if backend.needs_path else []
    lines += ["factory = 'pkg.mod:make'"] if backend.needs_factory else []
    lines += ["command = ['server', '--port', '{port}']"] if backend.runs_engine else []
    return parse_config("[[models]]\n" + "\n".join(lines), source="test.toml", base_dir=pathlib.Path("/cfg")).models[0]


def top_level_names(module_name: str) -> set[str]:
    """Read from the source, so the test process never imports torch or mlx."""
    origin = importlib.util.find_spec(module_name).origin
    tree = ast.parse(pathlib.Path(origin).read_text(encoding="utf-8"))
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


@pytest.mark.parametrize("backend", REGISTERED, ids=lambda b: b.name)
def test_every_loader_names_a_function_in_an_installed_module(backend):
    module_name, _, attr = backend.loader.partition(":")
    assert attr in top_level_names(module_name)


def test_null_lm_loads_through_the_registry():
    spec = WorkerSpec(worker_id="n-0", socket="/tmp/n.sock", backend="null-lm", parent_pid=1)
    assert _load(spec).device == "none"


def test_an_unregistered_backend_is_a_boot_failure():
    spec = WorkerSpec(worker_id="t-0", socket="/tmp/t.sock", backend="tf", parent_pid=1)
    with pytest.raises(BootFailure, match="unknown backend 'tf'"):
        _load(spec)


@pytest.mark.parametrize("backend", REGISTERED, ids=lambda b: b.name)
def test_config_accepts_every_registered_backend(backend):
    assert parse_model(backend).generates == backend.generates


def test_config_refuses_a_name_outside_the_registry():
    with pytest.raises(ConfigError, match=f"must be one of {', '.join(BACKENDS)}, got 'tf'"):
        parse_config("[[models]]\nname='a'\nbackend='tf'", source="test.toml", base_dir=pathlib.Path("/cfg"))


@pytest.mark.parametrize("backend", [b for b in REGISTERED if not b.takes_mlx_limits], ids=lambda b: b.name)
def test_mlx_limits_are_refused_where_the_registry_says_so(backend):
    with pytest.raises(ConfigError, match="apply to backend mlx-lm only"):
        parse_model(backend, "memory_limit = '1GiB'")
