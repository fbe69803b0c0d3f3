"""How much of the machine other jobs took during a cell: busy CPU outside this benchmark's processes.

The machine's busy time (and time stolen by the hypervisor) from /proc/stat,
less the CPU of this process, its descendants (daemon, workers, peer
servers) and any process carrying a peer run's tag (Ray's that left the
session). Figures in cores, so 0.5 on a 2-core machine means a quarter of it
went elsewhere. Linux only; elsewhere None.
"""

from __future__ import annotations

import dataclasses
import os
import time

from benchmarks import processes

BUSY_FIELDS = (0, 1, 2, 5, 6, 7)   # user nice system irq softirq steal, after the "cpu" label


@dataclasses.dataclass(frozen=True)
class Snapshot:
    at: float                 # perf_counter seconds
    busy_s: float             # the whole machine
    ours_s: dict[int, float]  # pid -> CPU seconds of each of our live processes


def snapshot() -> Snapshot | None:
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()[1:]
    except OSError:
        return None
    busy = sum(int(fields[i]) for i in BUSY_FIELDS) / os.sysconf("SC_CLK_TCK")
    return Snapshot(time.perf_counter(), busy, {pid: processes.cpu_seconds(pid) for pid in _ours()})


def others_cores(before: Snapshot | None, after: Snapshot | None) -> float | None:
    if before is None or after is None or after.at <= before.at:
        return None
    ours = sum(cpu - before.ours_s.get(pid, 0.0) for pid, cpu in after.ours_s.items())
    return round(max(0.0, after.busy_s - before.busy_s - ours) / (after.at - before.at), 2)


def _ours() -> set[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = processes.parent_pid(int(entry))
            if parent is not None:
                parents.setdefault(parent, []).append(int(entry))
    found, frontier = set(), [os.getpid()]
    while frontier:
        pid = frontier.pop()
        if pid not in found:
            found.add(pid)
            frontier.extend(parents.get(pid, ()))
    return found | set(processes.tagged_by_any_run())
