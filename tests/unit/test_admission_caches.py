"""Prefix caches in admission, as pure functions: shrink live caches before refusing, then the candidate's own,
refuse only what does not fit with every cache at 0, give budgets back once memory frees; and the footprint's part
that is the cache."""

from __future__ import annotations

from mpsd.supervisor.memory.admission import (
    Candidate,
    LiveCache,
    MemoryView,
    decide,
    reclaimable_bytes,
    restore,
    restore_margin,
)
from mpsd.supervisor.memory.footprint import Footprint, estimate_cache_bytes

GiB = 1024**3
BLIND = MemoryView(100 * GiB, used_bytes=0, headroom_bytes=0)  # a probe whose `used` does not see our workers


def full(worker_id: str, budget: int, held: int | None = None) -> LiveCache:
    """A cache at its configured budget, as the worker reported it (holding `held`, its budget by default)."""
    return LiveCache(worker_id, budget, budget, budget if held is None else held, budget)


def test_a_candidate_that_fits_is_admitted_and_no_cache_shrinks():
    [decision] = decide(BLIND, [30 * GiB, 30 * GiB], [Candidate("c", 30 * GiB, 5 * GiB)], None,
                        [full("a", 10 * GiB), full("b", 10 * GiB)])
    assert (decision.admit, dict(decision.shrink), decision.cache_budget_bytes) == (True, {}, None)
    assert decision.reason == "admitted: needs 30.0GiB, 40.0GiB free of 100.0GiB budget after 0B headroom"


def test_live_caches_shrink_first_sharing_the_smallest_take_that_fits_in_proportion_to_their_budgets():
    caches = [full("a", 4 * GiB), full("b", 12 * GiB)]
    candidates = [Candidate("c", 28 * GiB), Candidate("d", 8 * GiB), Candidate("e", 9 * GiB)]
    shrink, refused = decide(BLIND, [40 * GiB, 40 * GiB], candidates, None, caches)
    # 20 GiB free, 28 needed: 8 GiB taken, a quarter from a (4 of 16 GiB budgets), three quarters from b.
    assert (shrink.worker_id, shrink.admit, shrink.refused) == ("c", False, False)
    assert dict(shrink.shrink) == {"a": 2 * GiB, "b": 6 * GiB}
    assert shrink.reason == ("making room: 2 live prefix caches shrink by 8.0GiB (needs 28.0GiB, 20.0GiB free of "
                             "100.0GiB budget after 0B headroom)")
    # With c's 28 GiB counted, 8 GiB are left even with every cache at 0: d waits its turn, e cannot fit.
    assert (refused.worker_id, refused.refused) == ("e", True)


def test_the_shrink_is_predicted_from_what_caches_hold_when_the_probe_sees_our_workers():
    memory = MemoryView(100 * GiB, used_bytes=90 * GiB, headroom_bytes=0)  # 10 GiB other, 80 GiB ours
    live, need = [40 * GiB, 40 * GiB], [Candidate("c", 20 * GiB)]
    # Full caches: shrinking frees real memory, half of it from each (5 GiB of 10 left to each).
    [decision] = decide(memory, live, need, None, [full("a", 10 * GiB), full("b", 10 * GiB)])
    assert dict(decision.shrink) == {"a": 5 * GiB, "b": 5 * GiB} and not decision.admit
    # Empty caches are budgets only: shrinking them frees nothing the probe would see.
    [empty] = decide(memory, live, need, None, [full("a", 10 * GiB, held=0), full("b", 10 * GiB, held=0)])
    assert empty.refused and empty.reason == "needs 20.0GiB, 10.0GiB free of 100.0GiB budget after 0B headroom"
    # 25 GiB: full caches make room (7.5 GiB from each, 2.5 GiB left of each budget) ...
    more = [Candidate("c", 25 * GiB)]
    [both_full] = decide(memory, live, more, None, [full("a", 10 * GiB), full("b", 10 * GiB)])
    assert dict(both_full.shrink) == {"a": 2 * GiB + GiB // 2, "b": 2 * GiB + GiB // 2}
    # ... one full and one empty free only a's 10 GiB, though their budgets count 20: never shrunk for nothing.
    [half] = decide(memory, live, more, None, [full("a", 10 * GiB), full("b", 10 * GiB, held=0)])
    assert half.refused and dict(half.shrink) == {}
    assert half.reason.endswith("; with every prefix cache at 0 (20.0GiB free) still 5.0GiB short")


def test_nothing_is_decided_while_a_shrunk_cache_has_not_settled():
    fits = [Candidate("c", GiB)]
    applied = LiveCache("a", 5 * GiB, 10 * GiB, held_bytes=3 * GiB, reported_budget_bytes=5 * GiB)
    not_yet_applied = LiveCache("a", 5 * GiB, 10 * GiB, held_bytes=3 * GiB, reported_budget_bytes=10 * GiB)
    still_holding = LiveCache("a", 5 * GiB, 10 * GiB, held_bytes=7 * GiB, reported_budget_bytes=5 * GiB)
    assert not applied.pending and not_yet_applied.pending and still_holding.pending
    assert decide(BLIND, [20 * GiB], fits, None, [not_yet_applied]) == []
    assert decide(BLIND, [20 * GiB], fits, None, [still_holding]) == []
    assert [d.admit for d in decide(BLIND, [20 * GiB], fits, None, [applied])] == [True]
    assert decide(BLIND, [20 * GiB], fits, "x-0", [applied]) == [], "a start settling blocks as before"


def test_with_live_caches_at_0_not_enough_the_candidate_starts_with_its_own_cache_shrunk():
    candidate = Candidate("c", 24 * GiB, cache_bytes=8 * GiB)
    # 10 GiB free, 10 more in live caches: first every live cache goes to 0 ...
    [first] = decide(BLIND, [45 * GiB, 45 * GiB], [candidate], None, [full("a", 5 * GiB), full("b", 5 * GiB)])
    assert (first.admit, dict(first.shrink)) == (False, {"a": 0, "b": 0})
    # ... and once they have, it is admitted with 4 GiB of its 8 GiB cache.
    settled = [LiveCache(w, 0, 5 * GiB, 0, 0) for w in ("a", "b")]
    [second] = decide(BLIND, [40 * GiB, 40 * GiB], [candidate], None, settled)
    assert (second.admit, dict(second.shrink), second.cache_budget_bytes) == (True, {}, 4 * GiB)
    assert second.reason == ("admitted: needs 24.0GiB, 20.0GiB free of 100.0GiB budget after 0B headroom; "
                             "its prefix cache shrunk to 4.0GiB of 8.0GiB")


def test_a_candidate_that_does_not_fit_with_every_cache_at_0_is_refused_and_nothing_shrinks():
    [decision] = decide(BLIND, [45 * GiB, 45 * GiB], [Candidate("c", 30 * GiB, cache_bytes=8 * GiB)], None,
                        [full("a", 5 * GiB), full("b", 5 * GiB)])
    assert decision.refused and dict(decision.shrink) == {} and decision.cache_budget_bytes is None
    assert decision.reason == ("needs 30.0GiB, 10.0GiB free of 100.0GiB budget after 0B headroom; with every prefix "
                               "cache at 0 (20.0GiB free and its own 8.0GiB left out) still 2.0GiB short")


def test_restore_gives_budgets_back_above_the_margin_shared_as_shrinks_are_and_never_while_settling():
    assert restore_margin(100 * GiB) == GiB
    caches = [LiveCache("a", 2 * GiB, 4 * GiB, 2 * GiB, 2 * GiB), LiveCache("b", GiB, 4 * GiB, GiB, GiB)]  # 5 missing
    assert restore(BLIND, [40 * GiB, 40 * GiB], caches, None) == {"a": 4 * GiB, "b": 4 * GiB}
    # 3.5 GiB free: 2.5 given back above the 1 GiB margin, 2/5 of it to a, 3/5 to b.
    partial = [48 * GiB + GiB // 4] * 2
    assert restore(BLIND, partial, caches, None) == {"a": 3 * GiB, "b": GiB + GiB * 3 // 2}
    assert restore(BLIND, [49 * GiB + GiB // 4] * 2, caches, None) == {}, "0.5 GiB: less than the margin"
    assert restore(BLIND, [40 * GiB, 40 * GiB], caches, "x-0") == {}, "a start settles"
    pending = LiveCache("c", GiB, 4 * GiB, held_bytes=2 * GiB, reported_budget_bytes=GiB)
    assert restore(BLIND, [40 * GiB, 40 * GiB], [*caches, pending], None) == {}, "a shrink settles"
    assert restore(BLIND, [40 * GiB, 40 * GiB], [full("a", 4 * GiB)], None) == {}, "nothing shrunk"


def test_restore_counts_what_caches_may_still_fill_so_a_probe_blind_to_budgets_is_not_given_out_twice():
    memory = MemoryView(100 * GiB, used_bytes=96 * GiB, headroom_bytes=0)  # `used` outweighs the footprints
    caches = [LiveCache(w, 2 * GiB, 6 * GiB, 2 * GiB, 2 * GiB) for w in ("a", "b")]
    given = restore(memory, [30 * GiB, 20 * GiB], caches, None)
    assert given == {"a": 3 * GiB + GiB // 2, "b": 3 * GiB + GiB // 2}  # 4 GiB free, 3 above the margin
    # Applied: the budgets grew, the caches did not fill yet, so the probe's `used` is the same.
    after = [LiveCache(w, given[w], 6 * GiB, 2 * GiB, given[w]) for w in ("a", "b")]
    assert restore(memory, [31 * GiB + GiB // 2, 21 * GiB + GiB // 2], after, None) == {}


def test_reclaimable_bytes_is_the_room_every_live_cache_at_0_would_add():
    assert reclaimable_bytes(BLIND, [40 * GiB, 40 * GiB], [full("a", 4 * GiB), full("b", 12 * GiB)]) == 16 * GiB
    seeing = MemoryView(100 * GiB, used_bytes=90 * GiB, headroom_bytes=0)
    assert reclaimable_bytes(seeing, [40 * GiB, 40 * GiB], [full("a", 10 * GiB), full("b", 10 * GiB, 0)]) == 10 * GiB
    assert reclaimable_bytes(BLIND, [40 * GiB], []) == 0


def test_the_footprint_counts_the_cache_at_its_configured_budget_and_an_oom_raise_leaves_it_as_it_is():
    footprint = Footprint(estimated_bytes=5 * GiB, estimated_cache_bytes=GiB)
    assert (footprint.bytes, footprint.cache_bytes) == (5 * GiB, GiB), "the config's word until a worker reports"
    footprint.observe(6 * GiB, 2 * GiB)
    assert (footprint.bytes, footprint.cache_bytes, footprint.source) == (6 * GiB, 2 * GiB, "learned")
    footprint.observe(5 * GiB, GiB)
    assert (footprint.bytes, footprint.cache_bytes) == (6 * GiB, 2 * GiB), "the most any worker reported"
    footprint.raise_after_oom(observed_peak_bytes=GiB)
    assert (footprint.bytes, footprint.cache_bytes) == (7 * GiB, 2 * GiB), "4 GiB without the cache × 1.25, + 2"
    footprint.raise_after_oom(observed_peak_bytes=8 * GiB)
    assert footprint.bytes == 10 * GiB, "what it held without its cache, plus the cache once"

    off = Footprint(estimated_bytes=5 * GiB, estimated_cache_bytes=GiB)
    off.observe(3 * GiB, 0)
    assert off.cache_bytes == 0, "a worker that keeps no cache replaces the estimate"
    assert Footprint(5 * GiB, configured_bytes=GiB, estimated_cache_bytes=2 * GiB).cache_bytes == GiB, "a part of it"


def test_estimate_cache_bytes_takes_a_size_as_given_else_a_fraction_of_the_footprint():
    assert estimate_cache_bytes(GiB, None, 8 * GiB) == GiB
    assert estimate_cache_bytes(None, 0.25, 8 * GiB) == 2 * GiB
    assert estimate_cache_bytes(None, None, 8 * GiB) == 0


def test_a_cache_holding_more_than_its_budget_frees_nothing_until_it_is_given_a_lower_one():
    memory = MemoryView(100 * GiB, used_bytes=90 * GiB, headroom_bytes=0)  # 10 GiB free
    over = LiveCache("a", 2 * GiB, 2 * GiB, held_bytes=5 * GiB, reported_budget_bytes=2 * GiB)  # not shrunk
    [decision] = decide(memory, [40 * GiB, 40 * GiB], [Candidate("c", 12 * GiB, cache_bytes=GiB)], None, [over])
    # Left as it is, the cache keeps its 5 GiB: the candidate's own 1 GiB cannot make up 2 GiB (never a budget < 0).
    # Any lower budget makes the worker let go of what it holds above it: the least shrink is enough.
    assert (decision.admit, decision.cache_budget_bytes, dict(decision.shrink)) == (False, None, {"a": 2 * GiB - 1})
