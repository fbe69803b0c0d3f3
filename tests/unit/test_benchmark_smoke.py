"""The benchmark harness runs end to end at tiny settings and produces every figure, well-formed.

No timing is asserted: figures on a shared machine are compared only within one run.
"""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = ("direct_tps", "mpsd_tps", "per_token_overhead_ms", "ttft_ms", "transport_tps", "scaling", "peers",
        "daemon_rss_bytes", "restart_s", "machine", "start_to_ready_s", "worker_rss_beyond_weights_bytes",
        "transport_cpu_ms_per_1k_tokens")


def test_tiny_run_writes_every_figure(tmp_path, demo_model):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--tiny", "--no-peers", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(KEYS) <= set(results)
    for key in ("direct_tps", "mpsd_tps", "daemon_rss_bytes", "restart_s", "start_to_ready_s"):
        assert isinstance(results[key], (int, float)) and results[key] > 0 and math.isfinite(results[key]), key
    assert set(results["per_token_overhead_ms"]) == {"p50", "p99"}
    assert set(results["ttft_ms"]) >= {"direct", "mpsd"} and all(v["p50"] > 0 for v in results["ttft_ms"].values())
    assert set(results["transport_tps"]) == {"1", "8"} and all(v > 0 for v in results["transport_tps"].values())
    scaling = results["scaling"]
    assert scaling["workers"] == [1] and all(len(scaling[k]) == 1 and scaling[k][0] > 0 for k in ("mpsd", "threads", "ideal"))
    assert set(results["peers"]) == {"ray-serve", "litserve"} and all("error" in p for p in results["peers"].values())
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mpsd 1 worker tokens/s, 1 stream |" in result.stdout
