"""`python -m benchmarks predict` at tiny settings: a batched mpsd is started, its answer checked against the model,
and each load level measured with well-formed figures; the report renders every system and the targets. No timing
is asserted: a shared machine's figures are compared only within one run. LitServe is not run here (no venv)."""

import dataclasses

from benchmarks import predict, predict_report
from benchmarks.predict_models import MODELS


def test_a_batched_mpsd_is_checked_then_measured_at_each_level_in_rounds():
    model = MODELS["mlp-1m"]
    sizes = dataclasses.replace(predict.Sizes.tiny(), levels=(1, 3), rounds=2)
    start = lambda: predict.MpsdSystem(predict.mpsd_config(model, 4, 2.0, threads=1))  # noqa: E731
    lines: list[str] = []
    systems = predict.side_by_side({"mpsd batched": start}, model, sizes, lines.append)
    cells = systems["mpsd batched"]
    assert "error" not in cells, (cells, lines)
    assert set(cells) == {"1", "3"}
    for clients, cell in cells.items():
        assert cell["clients"] == int(clients) and cell["failures"] == 0, cell
        assert cell["replies"] > 0 and cell["rps"] in cell["rps_rounds"] and len(cell["rps_rounds"]) == 2, cell
        assert 0 < cell["latency_ms"]["p50"] <= cell["latency_ms"]["p99"], cell
        assert set(cell["cpu_ms_per_reply"]) == {"daemon", "worker", "client"}, cell
        assert all(ms >= 0 for ms in cell["cpu_ms_per_reply"].values()) and cell["cpu_ms_per_reply"]["worker"] > 0


def test_the_forward_pass_alone_is_timed_for_each_batch_size():
    figures = predict.forward_ms(MODELS["mlp-1m"], threads=1, batch_sizes=(1, 4))
    assert set(figures) == {"1", "4"} and all(ms > 0 for ms in figures.values())


def test_a_system_that_cannot_start_is_recorded_not_raised():
    def broken():
        raise RuntimeError("no such server")

    cells = predict.run_system("nothing", broken, MODELS["mlp-1m"], (1,), predict.Sizes.tiny(), lambda _line: None)
    assert cells == {"error": "RuntimeError: no such server"}


def test_the_report_puts_every_system_side_by_side_with_the_targets(tmp_path):
    cell = lambda rps: {"clients": 32, "rps": rps, "replies": 10, "failures": 0,  # noqa: E731
                        "latency_ms": {"p50": 1.0, "p99": 2.0},
                        "cpu_ms_per_reply": {"daemon": 1.0, "worker": 0.5, "client": 0.25}}
    results = {"command": "python -m benchmarks predict", "cores": 2, "threads": 1, "model": "mlp-9m: MLP",
               "sizes": dataclasses.asdict(predict.Sizes()), "elapsed_s": 1.0, "litserve": {"version": "0.2.19"},
               "settings": {"mpsd batched": "max_batch_size 32"}, "forward_ms": {"1": 1.0, "32": 8.0},
               "systems": {"mpsd unbatched": {"32": cell(100)}, "mpsd batched": {"32": cell(400)},
                           "LitServe": {"error": "PeerError: no venv"}},
               "ratios": {"mpsd batched / mpsd unbatched": [4.0, 3.5, 4.5], "mpsd batched / LitServe": []},
               "sweeps": {"LitServe": {"max_batch_size 8": {"error": "PeerError: no venv"}}}}
    text = predict_report.write(results, tmp_path)
    assert "| mpsd batched (max_batch_size 32) | 32 | 400 |" in text and "| LitServe | | not run: PeerError" in text
    assert "| max_batch_size 8 | not run: PeerError: no venv | | |" in text
    assert "1 row(s) 1.000 ms (1.000 ms a row), 32 row(s) 8.000 ms (0.250 ms a row)" in text
    assert "| mpsd batched (max_batch_size 32) | daemon 1.00, worker 0.50, client 0.25 | 1.75 |" in text
    assert "* mpsd batched / mpsd unbatched: 4.00x (rounds: 4.00, 3.50, 4.50)" in text
    met = "| mpsd batched >= 3x unbatched throughput at 32 clients | 4.00x (median of the rounds' ratios) | yes |"
    assert met in text
    assert "| mpsd batched ahead of LitServe (batched) at 32 clients | not measured | - |" in text
    assert (tmp_path / "results.json").is_file() and (tmp_path / "results.md").read_text() == text
