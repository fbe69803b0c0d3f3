"""The benchmark harness runs end to end at tiny settings and produces every figure, well-formed.

No timing is asserted: figures on a shared machine are compared only within one run.
"""

import json
import math
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]
KEYS = ("direct_tps", "mpsd_tps", "per_token_overhead_ms", "ttft_ms", "transport", "scaling", "peers", "sweep",
        "targets", "daemon_rss_bytes", "restart_s", "machine", "model", "start_to_ready_s",
        "worker_rss_beyond_weights_bytes", "single_pairs", "mpsd_vs_direct")
CELL_KEYS = {"streams", "requests", "tokens", "seconds", "tps", "ttft_ms", "itl_ms", "tokens_per_stream", "failures",
             "failure_examples", "overtaken", "others_cores", "tps_runs", "requests_all_runs",
             "failures_all_runs", "overtaken_all_runs"}


def test_tiny_run_writes_every_figure(tmp_path, demo_model):
    result = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--tiny", "--no-peers", "--out", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(KEYS) <= set(results)
    for key in ("direct_tps", "mpsd_tps", "daemon_rss_bytes", "restart_s", "start_to_ready_s"):
        assert isinstance(results[key], (int, float)) and results[key] > 0 and math.isfinite(results[key]), key
    assert set(results["per_token_overhead_ms"]) == {"p50", "p99"}
    assert set(results["ttft_ms"]) == {"direct", "mpsd"} and all(v["p50"] > 0 for v in results["ttft_ms"].values())

    sweep = results["sweep"]
    assert set(sweep["systems"]) == {"direct", "mpsd"}
    for cells in sweep["systems"]["mpsd"].values():
        assert [c["streams"] for c in cells] == sweep["levels"]
        for c in cells:
            assert set(c) == CELL_KEYS and c["tps"] > 0 and c["failures"] == 0 and c["tokens"] > 0

    transport = results["transport"]
    assert set(transport["tps"]) == {"1", "8", "16"} and all(v > 0 for v in transport["tps"].values())
    assert all(set(v) == {"daemon", "worker", "clients", "wall"} for v in transport["cpu_ms_per_1k_tokens"].values())
    assert results["scaling"]["workers"] == [1] and results["scaling"]["mpsd"][0] > 0
    assert set(results["peers"]) == {"ray-serve", "litserve"} and all("error" in p for p in results["peers"].values())
    assert all({"target", "value", "met"} == set(t) for t in results["targets"])
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| mpsd | 1 | 1 |" in result.stdout


def test_http_edge_tiny_run_writes_every_figure(tmp_path):
    """mpsd's own server alone, in this interpreter (no peer venv): the harness, the server and the client agree."""
    result = subprocess.run([sys.executable, "-m", "benchmarks", "http_edge", "--tiny", "--out", str(tmp_path)],
                            check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["servers"]) == {"h11"} and not results["errors"]
    h11 = results["servers"]["h11"]
    for key in ("rss_before_http_mib", "rss_warm_mib", "rss_after_load_mib", "sse_tps", "p50_ms", "p99_ms"):
        assert isinstance(h11[key], (int, float)) and h11[key] > 0 and math.isfinite(h11[key]), key
    cell = h11["cells"][0]
    assert cell["sse"]["tokens"] == results["sizes"]["streams"] * results["sizes"]["events"]
    assert results["ratios_vs_h11"]["h11"]["sse_tps"] == 1.0
    assert "| mpsd HttpServer (h11" in result.stdout
