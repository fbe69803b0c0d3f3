"""The admin service's worker status from the fleet's view of a worker, without processes."""

import dataclasses

from mpsd.supervisor.edge.admin import AdminService
from mpsd.supervisor.fleet.snapshot import WorkerView
from mpsd.supervisor.fleet.states import WorkerState
from mpsd.supervisor.memory.process_memory import ProcessMemory
from mpsd.v1 import worker_pb2

CACHE = worker_pb2.PrefixCacheStats(bytes=3 << 20, budget_bytes=64 << 20, configured_bytes=128 << 20, entries=2,
                                    hit_tokens=40, miss_tokens=60, evictions=1)


def view(stats: worker_pb2.WorkerStats | None) -> WorkerView:
    return WorkerView(id="a-0", model="a", state=WorkerState.READY, reason="", state_age_s=1.0, uptime_s=1.0, pid=7,
                      restarts=0, memory_bytes=0, stats=stats, last_exit="", stderr_tail=())


def status_of(worker) -> object:
    return AdminService(fleet=None, pools={}, daemon_info={}, reload=None)._worker_status(worker)


def test_the_prefix_cache_is_what_the_worker_last_reported():
    status = status_of(view(worker_pb2.WorkerStats(prefix_cache=CACHE)))
    assert status.prefix_cache == CACHE and status.prefix_cache_note == ""


def test_no_report_yet_gives_an_empty_cache():
    status = status_of(view(None))
    assert status.prefix_cache == worker_pb2.PrefixCacheStats() and status.prefix_cache_note == ""


def test_the_fleets_note_on_a_shrunk_budget_is_passed_on():
    @dataclasses.dataclass(frozen=True)
    class NotedView(WorkerView):  # the fleet's view with the note it gives (snapshot.WorkerView.prefix_cache_note)
        prefix_cache_note: str = ""

    shrunk = worker_pb2.PrefixCacheStats(configured_bytes=128 << 20, budget_bytes=32 << 20)
    base = view(worker_pb2.WorkerStats(prefix_cache=shrunk))
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(WorkerView)}
    status = status_of(NotedView(**fields | {"prefix_cache_note": "shrunk to make room for b-0"}))
    assert status.prefix_cache.budget_bytes == 32 << 20 and status.prefix_cache_note == "shrunk to make room for b-0"


def test_the_process_tree_is_passed_on_in_full():
    tree = ProcessMemory(footprint=2 << 30, rss=6 << 30, uss=5 << 30, pss=4 << 30, clean_bytes=4 << 30, processes=3)
    status = status_of(dataclasses.replace(view(None), memory_bytes=tree.footprint, process_memory=tree))
    assert status.memory_bytes == 2 << 30 and status.process_memory.processes == 3
    assert (status.process_memory.rss_bytes, status.process_memory.clean_bytes) == (6 << 30, 4 << 30)
