"""The daemon-to-worker spec: read back exactly as written, or refused with the key named."""

import dataclasses
import json
import subprocess
import sys

import pytest

from mpsd.exitcodes import EXIT_BOOT_FAILURE
from mpsd.worker_spec import WorkerSpec, spec_help

REQUIRED = {"worker_id": "m-0", "socket": "/tmp/m-0.sock", "backend": "null-lm", "parent_pid": 42}


def test_round_trip_keeps_every_field():
    spec = WorkerSpec(**REQUIRED, path="/models/m", device="cpu", threads=3, concurrency=2, stop_grace_s=2.5,
                      mlx_memory_limit=1 << 30, mlx_wired_limit=0, mlx_cache_limit=1 << 20)
    assert WorkerSpec.from_json(spec.to_json()) == spec


def test_absent_optional_keys_take_the_defaults():
    assert WorkerSpec.from_json(json.dumps(REQUIRED)) == WorkerSpec(**REQUIRED)


def test_a_whole_number_is_a_fine_float():
    assert WorkerSpec.from_json(json.dumps({**REQUIRED, "stop_grace_s": 3})).stop_grace_s == 3


@pytest.mark.parametrize("change, key, problem", [
    ({"socket_path": "/tmp/x"}, "socket_path", "unknown"),
    ({"threads": "4"}, "threads", "must be int"),
    ({"parent_pid": True}, "parent_pid", "must be int"),
    ({"path": 3}, "path", "must be str | None"),
    ({"stop_grace_s": None}, "stop_grace_s", "must be float"),
    ({"mlx_cache_limit": 1.5}, "mlx_cache_limit", "must be int | None"),
])
def test_unknown_or_wrongly_typed_key_is_named(change, key, problem):
    with pytest.raises(ValueError, match=f"spec key '{key}': {problem}"):
        WorkerSpec.from_json(json.dumps({**REQUIRED, **change}))


@pytest.mark.parametrize("key", sorted(REQUIRED))
def test_missing_required_key_is_named(key):
    raw = {k: v for k, v in REQUIRED.items() if k != key}
    with pytest.raises(ValueError, match=f"spec key '{key}': missing"):
        WorkerSpec.from_json(json.dumps(raw))


@pytest.mark.parametrize("text", ["[1, 2]", "{not json"])
def test_text_that_is_not_an_object_is_refused(text):
    with pytest.raises(ValueError, match="spec: "):
        WorkerSpec.from_json(text)


def test_help_lists_every_field():
    assert all(field.name in spec_help() for field in dataclasses.fields(WorkerSpec))


def test_worker_refuses_a_bad_spec_as_a_boot_failure():
    bad = json.dumps({k: v for k, v in REQUIRED.items() if k != "socket"})
    result = subprocess.run([sys.executable, "-m", "mpsd.worker", "--spec", bad],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_BOOT_FAILURE
    assert "boot failure: bad --spec: spec key 'socket': missing" in result.stderr
