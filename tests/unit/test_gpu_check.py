"""benchmarks/gpu_check.sh runs where there is a GPU; here it must say, in one line, why it skipped."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_the_gpu_check_skips_with_its_reason_where_torch_sees_no_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: run benchmarks/gpu_check.sh itself")
    result = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gpu_check: SKIPPED: ") and "sees no CUDA device" in result.stdout
    assert len(result.stdout.strip().splitlines()) == 1
