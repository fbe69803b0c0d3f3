"""`python -m benchmarks constrained`'s in-process parts at tiny settings: figures well-formed, never timed.

The TTFT part starts a daemon through benchmarks/daemon_run.py, which the other benchmarks' smoke runs cover.
"""

import math

import pytest

pytest.importorskip("llguidance")

from benchmarks import constrained  # noqa: E402
from mpsd.worker.backends.torch_lm import TorchCausalLM  # noqa: E402


def test_throughput_and_mask_time_are_measured_for_both_kinds_of_row(demo_model):
    engine = TorchCausalLM(str(demo_model), "cpu")
    figures = constrained.throughput(engine, streams=2, max_tokens=6, rounds=1, progress=lambda _line: None)
    assert figures["free_tok_s"] > 0 and figures["constrained_tok_s"] > 0 and math.isfinite(figures["ratio"])
    assert set(figures["rounds"]) == {"free", "constrained"}
    mask = constrained.mask_time(engine, tokens=40)
    assert mask["tokens"] == 40 and 0 < mask["p50_us"] <= mask["p99_us"] and mask["vocab"] == engine.logits_width


def test_the_report_has_a_row_per_engine_and_the_compile_cost(tmp_path):
    results = {"model": "demo", "streams": 2, "max_tokens": 6, "command": "python -m benchmarks constrained",
               "engines": {"torch-lm": {"throughput": {"free_tok_s": 10, "constrained_tok_s": 9, "ratio": 0.9},
                                        "mask": {"mean_us": 1.0, "p99_us": 2.0, "vocab": 1024}}},
               "ttft": {"rounds": 1, "median_ms": {"no tools": 1.0, "same tools (kept compiled)": 1.0,
                                                   "new tools (compiled)": 3.0}, "compile_added_ms": 2.0}}
    text = constrained.report(results, tmp_path)
    assert "| torch-lm | 10 | 9 | 0.90x |" in text and "adds 2.0 ms" in text
    assert (tmp_path / "results.json").is_file()
