"""The demand policy as a pure function: starts on demand, idle stops, eviction by measured memory, anti-thrash."""

from __future__ import annotations

import dataclasses

from mpsd.supervisor.memory.demand import SCALE_UP_COOLDOWN_S, Blocked, ModelDemand, Start, Stop, WorkerLoad, decide

GiB = 1024**3
NOW = 1000.0


def model(name, queued=0, workers=0, **extra) -> ModelDemand:
    base = {"name": name, "min_replicas": 0, "max_replicas": 2, "keep_alive_s": 300.0, "priority": 0,
            "scale_up_queue": 1, "footprint_bytes": 10 * GiB, "queued": queued, "workers": workers,
            "starting": False, "failed": False, "last_start_at": None}
    return ModelDemand(**{**base, **extra})


def worker(id, model, inflight=0, ready_since=NOW - 600, idle_since=NOW - 60, ready=True) -> WorkerLoad:
    return WorkerLoad(id, model, ready, inflight, ready_since, idle_since)


def run(models, workers=(), free=0, waiting=(), evicting=False, min_residency=30.0, reclaimable=0):
    return decide(models, list(workers), free, list(waiting), NOW, min_residency, evicting, reclaimable)


def test_a_request_for_a_model_with_no_worker_starts_one():
    assert run([model("a", queued=1)]) == [Start("a", 1)]
    assert Start("a", 3).reason == "started on demand: 3 queued"  # what status and the log say


def test_starts_go_one_at_a_time_with_a_cooldown_up_to_max_replicas():
    busy = model("a", queued=5, workers=1)
    assert run([busy]) == [Start("a", 5)]
    assert run([dataclasses.replace(busy, starting=True)]) == [], "one at a time"
    assert run([dataclasses.replace(busy, last_start_at=NOW - SCALE_UP_COOLDOWN_S / 2)]) == [], "cooldown"
    assert run([dataclasses.replace(busy, workers=2)]) == [], "max_replicas"
    assert run([dataclasses.replace(busy, queued=1, scale_up_queue=2)]) == [], "fewer queued than scale_up_queue per worker"
    assert run([dataclasses.replace(busy, failed=True)]) == [], "a model that gave up does not load in a loop"


def test_a_model_with_no_worker_starts_at_once_whatever_the_cooldown():
    cold = model("a", queued=1, last_start_at=NOW - 1)
    assert run([cold]) == [Start("a", 1)]


def test_a_refused_load_whose_requests_have_gone_evicts_nobody():
    models = [model("a", workers=1, queued=0), model("b", workers=1)]
    assert run(models, [worker("b-0", "b")], free=0, waiting=["a"]) == []


def test_idle_workers_stop_after_keep_alive_down_to_min_replicas_and_never_with_keep_alive_minus_one():
    workers = [worker("a-0", "a", idle_since=NOW - 400), worker("a-1", "a", idle_since=NOW - 301),
               worker("a-2", "a", idle_since=NOW - 10)]
    assert run([model("a", workers=3, min_replicas=1, max_replicas=3)], workers) == [
        Stop("a-0", "stopped: idle 6m40s"), Stop("a-1", "stopped: idle 5m01s")]
    assert run([model("a", workers=3, min_replicas=2, max_replicas=3)], workers) == [Stop("a-0", "stopped: idle 6m40s")]
    assert run([model("a", workers=3, keep_alive_s=None, max_replicas=3)], workers) == []
    assert run([model("a", workers=3, queued=1, max_replicas=3)], workers) == [], "queued requests: nobody is idle"


def test_eviction_takes_the_least_recently_used_idle_worker_of_lower_priority_first():
    models = [model("a", workers=1), model("b", workers=1), model("c", workers=0, queued=1, starting=True),
              model("vip", workers=1, priority=5)]
    workers = [worker("vip-0", "vip", idle_since=NOW - 250), worker("a-0", "a", idle_since=NOW - 100),
               worker("b-0", "b", idle_since=NOW - 200)]
    actions = run(models, workers, free=5 * GiB, waiting=["c"])
    assert actions == [Stop("b-0", "evicted for model c (needs 10.0GiB, 5.0GiB free)", evicted_for="c")]
    assert run(models, workers, free=-6 * GiB, waiting=["c"]) == [
        Stop("b-0", "evicted for model c (needs 10.0GiB, 0B free)", evicted_for="c"),
        Stop("a-0", "evicted for model c (needs 10.0GiB, 0B free)", evicted_for="c")]


def test_only_a_worker_on_the_device_the_load_waits_for_is_evicted_for_it():
    models = [model("a", workers=1), model("b", workers=1), model("c", workers=0, queued=1, starting=True)]
    workers = [dataclasses.replace(worker("a-0", "a", idle_since=NOW - 250), device="cuda:0"),
               dataclasses.replace(worker("b-0", "b", idle_since=NOW - 100), device="cuda:1")]
    actions = decide(models, workers, 5 * GiB, ["c"], NOW, 30.0, False, 0, device="cuda:1")
    assert actions == [Stop("b-0", "evicted for model c (needs 10.0GiB, 5.0GiB free)", evicted_for="c")], \
        "a-0 is idle longer, but its memory is on another GPU"
    assert decide(models, workers[:1], 5 * GiB, ["c"], NOW, 30.0, False, 0, device="cuda:1") == []


def test_busy_young_and_minimum_workers_are_never_evicted_and_the_refusal_says_who_holds_memory():
    models = [model("a", workers=1), model("b", workers=1), model("m", workers=1, min_replicas=1),
              model("c", queued=1, starting=True)]
    workers = [worker("a-0", "a", inflight=1), worker("b-0", "b", ready_since=NOW - 12), worker("m-0", "m")]
    assert run(models, workers, free=GiB, waiting=["c"]) == [Blocked(
        "c", "nothing evictable (a-0 busy, b-0 resident 12s < 30s, m-0 at min_replicas 1)")]


def test_nothing_more_is_evicted_while_an_eviction_frees_memory():
    models = [model("a", workers=1), model("c", queued=1, starting=True)]
    assert run(models, [worker("a-0", "a")], free=0, waiting=["c"], evicting=True) == []


def test_alternating_requests_faster_than_min_residency_do_not_thrash():
    models = [model("a", workers=1), model("b", queued=1, starting=True)]
    fresh = [worker("a-0", "a", ready_since=NOW - 5, idle_since=NOW - 1)]
    assert run(models, fresh, free=0, waiting=["b"]) == [Blocked("b", "nothing evictable (a-0 resident 5s < 30s)")]


def test_a_model_alone_on_the_machine_gets_no_eviction_sentence_in_its_refusal():
    assert run([model("c", queued=1, starting=True)], [], free=0, waiting=["c"]) == []


def test_what_live_prefix_caches_can_give_back_makes_an_eviction_unnecessary():
    models = [model("a", workers=1), model("c", queued=1, starting=True)]
    workers = [worker("a-0", "a")]
    assert run(models, workers, free=5 * GiB, waiting=["c"], reclaimable=5 * GiB) == [], "admission shrinks caches"
    assert run(models, workers, free=5 * GiB, waiting=["c"], reclaimable=4 * GiB) == [Stop(
        "a-0", "evicted for model c (needs 10.0GiB, 5.0GiB free, 4.0GiB more in prefix caches)", evicted_for="c")]


def test_the_needy_model_needs_its_footprint_without_its_own_cache():
    workers = [worker("a-0", "a")]
    needy = model("c", queued=1, starting=True, cache_bytes=3 * GiB)
    assert run([model("a", workers=1), needy], workers, free=7 * GiB, waiting=["c"]) == [], "it starts with less cache"
    assert run([model("a", workers=1), needy], workers, free=7 * GiB - 1, waiting=["c"]) == [
        Stop("a-0", "evicted for model c (needs 10.0GiB, 7.0GiB free)", evicted_for="c")]


def test_an_evicted_worker_adds_its_footprint_without_its_cache_already_counted_as_reclaimable():
    needy = model("c", queued=1, starting=True)
    workers = [worker("b-0", "b", idle_since=NOW - 200), worker("a-0", "a", idle_since=NOW - 100)]
    # b-0 holds 10 GiB of which 4 GiB is cache: evicting it adds 6 GiB, so 1 + 6 < 10 and a-0 goes too.
    cached = [model("a", workers=1), model("b", workers=1, cache_bytes=4 * GiB), needy]
    assert [a.worker_id for a in run(cached, workers, free=GiB, waiting=["c"])] == ["b-0", "a-0"]
    uncached = [model("a", workers=1), model("b", workers=1), needy]
    assert [a.worker_id for a in run(uncached, workers, free=GiB, waiting=["c"])] == ["b-0"]
