"""The engines benchmark (an engine through mpsd against the same engine called directly) runs end to end at tiny
settings and writes every system's figures; an engine that is not installed is recorded as skipped, saying why.
No timing is asserted: a shared machine's figures are compared only within one run."""

import importlib.util
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
SYSTEMS = {"direct", "mpsd-http", "mpsd-grpc", "mpsd-2x-http", "mpsd-2x-grpc"}
INSTALLED = {"mlx": "mlx_lm", "llama-cpp": "llama_cpp"}


def test_tiny_engines_run_writes_every_system(tmp_path, demo_model):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "engines", "--tiny", "--out", str(tmp_path)],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["engines"]) == set(INSTALLED)
    for key, module in INSTALLED.items():
        group = results["engines"][key]
        if importlib.util.find_spec(module) is None:
            assert group["error"].startswith("skipped: ") and module.replace("_", "-") in group["error"], group
            continue
        assert "error" not in group, group
        assert set(group["systems"]) == SYSTEMS, key
        for name, system in group["systems"].items():
            cell = system["levels"]["1"]
            assert cell["failures"] == 0 and cell["requests"] == 2, (key, name, cell)
            assert cell["tps"] > 0 and cell["per_stream_tps"] > 0 and cell["ttft_ms"]["p50"] > 0, (key, name, cell)
            assert cell["ratio_tps"] > 0 and "engine" in cell["cpu_ms_per_1k_tokens"], (key, name, cell)
            assert cell["tokens_per_request"][1] > 0, (key, name, cell)
        assert "| mpsd-grpc | 1 |" in result.stdout
    assert all({"target", "value", "met"} == set(t) for t in results["targets"]) and results["targets"]
    assert (tmp_path / "results.md").is_file()
