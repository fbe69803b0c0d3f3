"""The status page without a browser: its rings stay one size however long the daemon runs, and rates come from
counters. (Its routes and their token: test_http_routes.py.)"""

import json

from mpsd.supervisor.edge.http.status_history import HistoryRing, ModelFigures, TransitionLines, median_since


def figures(tokens_total: float, queued: int = 0) -> dict[str, ModelFigures]:
    return {"demo": ModelFigures(tokens_total=tokens_total, queued=queued, inflight=1, ready=2)}


def test_history_size_stays_flat_over_a_long_run():
    ring = HistoryRing(period_s=1.0, span_s=900)
    sizes = []
    for second in range(10 * 900):  # two and a half hours of samples
        ring.add(1000.0 + second, figures(second * 10.0), used_bytes=2**30, budget_bytes=2**32)
        if second % 900 == 899:
            sizes.append((len(ring), len(json.dumps(ring.as_plain()))))
    full = sizes[1:]  # the first 900 s fill it
    assert {length for length, _ in full} == {901}
    assert max(size for _, size in full) - min(size for _, size in full) < 0.02 * full[0][1]
    plain = ring.as_plain()
    assert plain["span_s"] == 900 and plain["samples"][-1]["t"] == 1000.0 + 10 * 900 - 1


def test_tokens_per_second_is_the_counter_rate_between_samples():
    ring = HistoryRing(period_s=2.0)
    ring.add(100.0, figures(0.0), 0, 0)
    ring.add(102.0, figures(50.0, queued=3), 0, 0)
    ring.add(104.0, figures(40.0), 0, 0)  # a counter that went back (never in practice) reads as 0, not negative
    rates = [s["models"]["demo"]["tokens_per_s"] for s in ring.as_plain()["samples"]]
    assert rates == [0.0, 25.0, 0.0]
    assert ring.as_plain()["samples"][1]["models"]["demo"] == {"tokens_per_s": 25.0, "queued": 3, "inflight": 1,
                                                               "ready": 2, "ttft_p50_s": None}


def test_time_to_first_token_median_is_taken_from_the_new_observations_only():
    before = ((0.01, 10.0), (0.1, 10.0), (1.0, 10.0), (float("inf"), 10.0))   # ten fast ones, long ago
    now = ((0.01, 10.0), (0.1, 11.0), (1.0, 14.0), (float("inf"), 14.0))     # then one under 0.1 s, three under 1 s
    assert median_since(before, now) == 1.0
    assert median_since(now, now) is None
    assert median_since((), ((0.5, 3.0), (float("inf"), 3.0))) == 0.5
    assert median_since((), ((0.5, 0.0), (float("inf"), 2.0))) is None  # beyond the last bound: no figure


def test_a_model_added_later_starts_at_rate_zero():
    ring = HistoryRing()
    ring.add(1.0, {}, 0, 0)
    ring.add(2.0, figures(500.0), 0, 0)
    assert ring.as_plain()["samples"][-1]["models"]["demo"]["tokens_per_s"] == 0.0


def test_transition_lines_keep_the_newest_ones_as_the_log_writes_them():
    lines = TransitionLines(kept=3)
    for n in range(10):
        lines.add(f"demo-{n}", 100 + n, "READY", "BACKOFF", "killed by SIGKILL", wall_time=0)
    kept = lines.as_list()
    assert len(kept) == 3 and kept[-1].endswith("worker demo-9 pid=109 READY -> BACKOFF: killed by SIGKILL")
    lines.add("demo-0", 0, "PENDING", "REFUSED", "needs 1.0GiB")
    assert "pid=- PENDING -> REFUSED" in lines.as_list()[-1]

