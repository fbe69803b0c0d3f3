from mpsd.supervisor.memory.admission import Candidate, MemoryView, decide, free_bytes, oom_retry_due
from mpsd.supervisor.memory.footprint import Footprint, worker_peak_bytes

GiB = 1024**3


def engines(n):
    return [Candidate(f"ds4-{i}", 80 * GiB) for i in range(n)]


def test_ds4_two_engines_fit_a_256_gib_budget_the_third_and_fourth_are_refused():
    # The rest of the machine wires 24 GiB; 8 GiB headroom.
    memory = MemoryView(budget_bytes=256 * GiB, used_bytes=24 * GiB, headroom_bytes=8 * GiB)
    live: list[int] = []
    admitted = []
    for _ in range(4):  # one start at a time, each settling before the next decision
        pending = [c for c in engines(4) if c.worker_id not in admitted]
        decisions = decide(memory, live, pending, settling=None)
        starts = [d for d in decisions if d.admit]
        if not starts:
            break
        admitted.append(starts[0].worker_id)
        live.append(80 * GiB)
        memory = MemoryView(memory.budget_bytes, memory.used_bytes + 80 * GiB, memory.headroom_bytes)
    assert admitted == ["ds4-0", "ds4-1"]
    refused = decide(memory, live, engines(4)[2:], settling=None)
    assert [(d.worker_id, d.admit) for d in refused] == [("ds4-2", False), ("ds4-3", False)]
    assert refused[0].reason == "needs 80.0GiB, 64.0GiB free of 256.0GiB budget after 8.0GiB headroom"
    # Freeing one engine admits exactly one.
    freed = MemoryView(256 * GiB, 104 * GiB, 8 * GiB)
    again = decide(freed, [80 * GiB], engines(4)[2:], settling=None)
    assert [(d.worker_id, d.admit) for d in again] == [("ds4-2", True), ("ds4-3", False)]


def test_our_workers_are_counted_once_and_other_is_never_negative():
    with_ours = MemoryView(100 * GiB, used_bytes=60 * GiB, headroom_bytes=0)   # 20 other + 40 ours
    assert free_bytes(with_ours, [40 * GiB]) == 40 * GiB
    blind = MemoryView(100 * GiB, used_bytes=10 * GiB, headroom_bytes=0)      # probe sees less than ours
    assert free_bytes(blind, [40 * GiB]) == 60 * GiB


def test_nothing_starts_while_a_started_worker_has_not_settled():
    memory = MemoryView(100 * GiB, 0, 0)
    assert decide(memory, [], [Candidate("a", GiB)], settling="b-0") == []


def test_only_one_start_per_decision_the_rest_wait_or_are_refused():
    memory = MemoryView(10 * GiB, 0, 0)
    decisions = decide(memory, [], [Candidate("a", 4 * GiB), Candidate("b", 4 * GiB), Candidate("c", 8 * GiB)], None)
    assert [(d.worker_id, d.admit) for d in decisions] == [("a", True), ("c", False)]  # b waits its turn


def test_footprint_precedence_and_oom_raise():
    footprint = Footprint(estimated_bytes=2 * GiB)
    assert (footprint.bytes, footprint.source) == (2 * GiB, "estimated")
    footprint.observe(3 * GiB)
    assert (footprint.bytes, footprint.source) == (3 * GiB, "learned")
    footprint.raise_after_oom(observed_peak_bytes=GiB)
    assert footprint.bytes == int(3 * GiB * 1.25)
    configured = Footprint(estimated_bytes=2 * GiB, configured_bytes=GiB, learned_bytes=5 * GiB)
    assert (configured.bytes, configured.source) == (GiB, "configured")


def test_worker_peak_takes_the_device_figure_when_larger():
    assert worker_peak_bytes(400, {"mps_driver_allocated": 900, "mps_recommended_max": 10**12}) == 900
    assert worker_peak_bytes(400, {}) == 400


def test_an_oom_worker_is_retried_only_when_memory_has_really_changed():
    MiB = 1024**2
    # A small model on a 24 GiB host: the floor is 1% of the budget, not 64 MiB of noise.
    assert not oom_retry_due(free=10 * GiB + 200 * MiB, free_at_oom=10 * GiB, footprint_bytes=600 * MiB, budget_bytes=24 * GiB)
    assert oom_retry_due(free=10 * GiB + 250 * MiB, free_at_oom=10 * GiB, footprint_bytes=600 * MiB, budget_bytes=24 * GiB)
    # An 80 GB model on a 256 GB Mac: a tenth of the footprint.
    assert not oom_retry_due(free=20 * GiB + 7 * GiB, free_at_oom=20 * GiB, footprint_bytes=80 * GiB, budget_bytes=256 * GiB)
    assert oom_retry_due(free=20 * GiB + 8 * GiB, free_at_oom=20 * GiB, footprint_bytes=80 * GiB, budget_bytes=256 * GiB)
    # A tiny budget: never less than 64 MiB.
    assert not oom_retry_due(free=63 * MiB, free_at_oom=0, footprint_bytes=MiB, budget_bytes=GiB)
    assert oom_retry_due(free=64 * MiB, free_at_oom=0, footprint_bytes=MiB, budget_bytes=GiB)
