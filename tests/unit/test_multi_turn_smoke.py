"""The multi-turn (prefix reuse) benchmark runs end to end at tiny settings, mpsd's systems only, and writes
every figure, well-formed. No timing is asserted: a shared machine's figures are compared only within one run."""

import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIGURES = {"requests", "failures", "wall_s", "prompt_tps", "tps", "ttft_ms_turn1", "ttft_ms_turns_ge2",
           "ttft_ms_turns_ge3", "hit_rate_turns_ge2", "per_turn", "prompt_tokens_max", "replies", "cache"}


def test_tiny_multi_turn_run_writes_every_figure(tmp_path, demo_model):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "multi_turn", "--tiny", "--peers", "", "--out",
                             str(tmp_path)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    systems = results["systems"]
    for name in ("mpsd-torch", "mpsd-torch-no-cache"):
        figures = systems[name]
        assert FIGURES <= set(figures), name
        assert figures["failures"] == 0 and figures["requests"] == 2 * 3, name
        assert set(figures["per_turn"]) == {"1", "2", "3"} and figures["tps"] > 0, name
    assert systems["mpsd-torch-no-cache"]["hit_rate_turns_ge2"] == 0
    assert systems["mpsd-torch"]["hit_rate_turns_ge2"] > 0.5   # the system prompt and every earlier turn
    assert all(w["budget_bytes"] > 0 for w in systems["mpsd-torch"]["cache"])
    assert all("error" in systems[name] for name in ("mpsd-torch-2x-prefix", "mlx_lm.server", "llama-cpp-python"))
    no_reuse = results["no_reuse"]
    assert no_reuse["tps_on"] > 0 and no_reuse["tps_off"] > 0
    assert no_reuse["rounds"]["on"][0]["hit_rate_turns_ge2"] < 0.05
    assert {t["target"] for t in results["targets"]} and all({"target", "value", "met"} == set(t)
                                                              for t in results["targets"])
    assert "| mpsd-torch |" in result.stdout and (tmp_path / "results.md").is_file()
