"""Prefix cache budgets through the fleet, on test_fleet's fakes: a shrink reaches the worker in its Stats requests,
status says why, the candidate waits until the worker reports it holds no more, and budgets come back."""

from __future__ import annotations

from mpsd.config import MemoryConfig, ModelConfig
from mpsd.supervisor.fleet.cache_budgets import CacheBudgets, requested_budget
from mpsd.supervisor.fleet.devices import FleetDevices
from mpsd.supervisor.fleet.records import WorkerRecord
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.footprint import Footprint
from mpsd.supervisor.memory.snapshot import MemorySnapshot
from mpsd.v1 import worker_pb2
from test_fleet import FakeProcess, Harness, run

GiB = 1024**3
LM = """
[[models]]
name = "lm"
backend = "torch-lm"
path = "@demo"
replicas = {replicas}
footprint = "4GiB"
prefix_cache = "2GiB"
"""
BIG = """
[[models]]
name = "big"
backend = "null-lm"
replicas = 1
footprint = "10GiB"
"""


def cache_stats(held: int, budget: int) -> worker_pb2.WorkerStats:
    prefix = worker_pb2.PrefixCacheStats(bytes=held, budget_bytes=budget, configured_bytes=2 * GiB)
    return worker_pb2.WorkerStats(device="cpu", prefix_cache=prefix)


class CacheHarness(Harness):
    """lm workers report a 2 GiB prefix cache holding 1.5 GiB until the test says otherwise."""

    def _launch(self, spec, env) -> FakeProcess:
        process = super()._launch(spec, env)
        if spec.model == "lm":
            process.stats_reply = cache_stats(held=3 * GiB // 2, budget=2 * GiB)
        return process

    async def shrunk_for_big(self) -> None:
        """Two lm workers (4 GiB each, 2 of it cache) READY on 16 GiB; big (10 GiB) finds 8 free: caches shrink."""
        for _ in range(5):  # lm-0 spawned, READY; lm-1 spawned, READY; big-0's decision
            await self.step()
        assert [self.state(w) for w in ("lm-0", "lm-1")] == [WorkerState.READY] * 2

    def note(self, worker_id: str) -> str:
        return next(w.prefix_cache_note for w in self.fleet.snapshot().workers if w.id == worker_id)


def test_a_ready_workers_cache_shrinks_for_a_new_worker_which_starts_once_the_worker_holds_no_more(tmp_path):
    async def scenario():
        h = CacheHarness(tmp_path, LM.format(replicas=2) + BIG)
        await h.shrunk_for_big()
        big = h.fleet.workers["big-0"]
        assert big.state == WorkerState.PENDING and not h.processes[2:], "no process before the room is there"
        assert big.reason == ("making room: 2 live prefix caches shrink by 2.0GiB (needs 10.0GiB, 8.0GiB free of "
                              "16.0GiB budget after 0B headroom)")
        for process in h.processes:
            assert process.budgets[-1] == GiB, "sent at once, not at the next probe"
        assert h.note("lm-0") == "shrunk to 1.0GiB of 2.0GiB configured: room for worker big-0"
        assert h.note("big-0") == ""

        await h.step(1)  # the next probe carries the budget again; the worker still holds 1.5 GiB
        assert [p.budgets[-1] for p in h.processes] == [GiB, GiB] and h.state("big-0") == WorkerState.PENDING
        await h.step()
        assert h.state("big-0") == WorkerState.PENDING, "nobody starts into memory not yet freed"

        for process in h.processes:
            process.stats_reply = cache_stats(held=GiB // 2, budget=GiB)
        await h.step(1)  # the probes bring the applied budget
        await h.step()
        assert h.state("big-0") == WorkerState.STARTING
        assert big.reason.startswith("admitted: needs 10.0GiB, 10.0GiB free of 16.0GiB budget")

    run(scenario)


def test_budgets_are_given_back_once_memory_frees(tmp_path):
    async def scenario():
        h = CacheHarness(tmp_path, LM.format(replicas=2) + BIG)
        await h.shrunk_for_big()
        for process in h.processes:
            process.stats_reply = cache_stats(held=GiB // 2, budget=GiB)
        await h.step(1)
        await h.step()
        await h.step()
        assert h.state("big-0") == WorkerState.READY
        assert h.fleet.workers["lm-0"].prefix_cache_budget == GiB, "kept while big-0 holds the room"

        h.fleet.commands.drain_worker("big-0")
        await h.step()
        await h.step()
        assert h.state("big-0") == WorkerState.STOPPED
        for worker_id, process in zip(("lm-0", "lm-1"), h.processes):
            assert h.fleet.workers[worker_id].prefix_cache_budget is None and h.note(worker_id) == ""
            assert process.budgets[-1] == 2 * GiB, "its configured budget, until it reports it runs it again"

    run(scenario)


def test_a_worker_that_loses_its_process_forgets_its_budget(tmp_path):
    async def scenario():
        h = CacheHarness(tmp_path, LM.format(replicas=2) + BIG)
        await h.shrunk_for_big()
        lm0 = h.fleet.workers["lm-0"]
        assert lm0.prefix_cache_budget == GiB
        h.processes[0].exit(1)
        await h.step()
        assert lm0.state == WorkerState.BACKOFF
        await h.step()
        assert (lm0.prefix_cache_budget, lm0.prefix_cache_note) == (None, "")
        assert h.fleet.workers["lm-1"].prefix_cache_budget == GiB, "a live worker keeps its own"

    run(scenario)


def test_a_worker_admitted_with_its_own_cache_shrunk_gets_that_budget_with_its_first_probe(tmp_path):
    async def scenario():
        h = CacheHarness(tmp_path, LM.format(replicas=1))
        h.set_memory(budget=5 * GiB, used=2 * GiB)  # 3 GiB free for a 4 GiB worker with a 2 GiB cache
        await h.step()
        worker = h.fleet.workers["lm-0"]
        assert worker.state == WorkerState.STARTING
        assert worker.reason == ("admitted: needs 4.0GiB, 3.0GiB free of 5.0GiB budget after 0B headroom; its prefix "
                                 "cache shrunk to 1.0GiB of 2.0GiB; loading the model")
        await h.step()
        assert h.processes[0].budgets == [GiB] and worker.state == WorkerState.READY
        assert h.note("lm-0") == "shrunk to 1.0GiB of 2.0GiB configured: the machine's memory could not hold it"

    run(scenario)


class OneDevice:
    name = "test"

    def devices(self):
        return (MemorySnapshot("test", 16 * GiB, 0, 16 * GiB),)


def test_nothing_is_given_back_while_a_worker_waits_pending_even_a_shrink_that_settled_at_once():
    # The worker runs a smaller cache than its model's fullest (1 GiB of 2): a shrink to 1.5 GiB is applied already.
    model = ModelConfig(name="lm", backend="torch-lm", path="@demo")
    worker = WorkerRecord(id="lm-0", model=model, state=WorkerState.READY, prefix_cache_budget=3 * GiB // 2,
                          stats=worker_pb2.WorkerStats(prefix_cache=worker_pb2.PrefixCacheStats(
                              bytes=GiB // 2, budget_bytes=GiB, configured_bytes=GiB)))
    waiting = WorkerRecord(id="big-0", model=model, state=WorkerState.PENDING)
    workers, sent = {"lm-0": worker, "big-0": waiting}, []
    devices = FleetDevices(workers, probe=lambda: OneDevice(), memory_config=MemoryConfig,
                           counted_bytes=lambda w: 4 * GiB - caches.shrunk_by(w))
    caches = CacheBudgets(workers, footprints={"lm": Footprint(4 * GiB, 4 * GiB, estimated_cache_bytes=2 * GiB)},
                          send_budget=sent.append, devices=devices,
                          settling=lambda device, looks: "big-0" if waiting.state == WorkerState.STARTING else None)
    looks = devices.read()
    assert not caches.live("default", looks)[0].pending and requested_budget(worker) == GiB, \
        "no more than it resolved its cache to"
    caches.give_back()
    assert worker.prefix_cache_budget == 3 * GiB // 2 and sent == [], "the room is big-0's, admitted next pass"
    waiting.state = WorkerState.STARTING
    caches.give_back()
    assert worker.prefix_cache_budget == 3 * GiB // 2, "nor while it starts"
    waiting.state = WorkerState.READY
    caches.give_back()
    assert (worker.prefix_cache_budget, worker.prefix_cache_note, sent) == (None, "", [worker])
