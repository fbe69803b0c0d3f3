"""What the fleet knows of each worker, and what it counts per model.

Plain data, and the shape of the one door (`Transition`) the fleet hands its
parts: only the fleet and the parts it composes write these records, state and
reason only through `Fleet._transition`; everyone else reads a FleetSnapshot.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Iterable

from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.process import WorkerProcess
from mpsd.supervisor.fleet.states import PROCESS_STATES, WorkerState
from mpsd.v1 import worker_pb2

CONFIGURED = "configured; waiting for admission"


class KillCause(str, enum.Enum):
    """Why the fleet itself SIGKILLed a worker's process, so its exit is not blamed on someone outside."""

    LOAD_TIMEOUT = "load_timeout"      # STARTING for longer than the model's load_timeout
    HEALTH_TIMEOUT = "health_timeout"  # READY but silent to health probes


class AfterStop(str, enum.Enum):
    """What an operator asked to happen once a worker has stopped."""

    STAY = "stay"
    RESTART = "restart"
    REMOVE = "remove"


@dataclasses.dataclass
class WorkerRecord:
    id: str
    model: ModelConfig
    state: WorkerState = WorkerState.PENDING
    reason: str = CONFIGURED
    state_since: float = 0.0
    process: WorkerProcess | None = None
    starts: int = 0
    failure_times: list[float] = dataclasses.field(default_factory=list)
    consecutive_failures: int = 0
    last_exit: str = ""
    stderr_tail: list[str] = dataclasses.field(default_factory=list)
    stats: worker_pb2.WorkerStats | None = None
    peak_bytes: int = 0
    oom_events_seen: int = 0
    free_at_oom: int = 0
    next_attempt_at: float = 0.0
    stop_deadline: float = 0.0
    started_at: float = 0.0
    ready_at: float = 0.0
    last_probe_at: float = 0.0
    last_probe_ok_at: float = 0.0
    probe_failures: int = 0
    probing: bool = False
    kill_cause: KillCause | None = None
    kill_detail: str = ""  # the numbers behind kill_cause, for the exit's description
    after_stop: AfterStop = AfterStop.STAY
    evicted_for: str = ""  # the model it is being stopped to make room for
    prefix_cache_budget: int | None = None  # the budget the daemon set for its prefix cache; None: as configured
    prefix_cache_note: str = ""  # why its prefix cache is shrunk, with the numbers, for status; "" when it is not
    device: str = ""  # the probe's device it was placed on (held while it has a process; goes back to on restart)

    @property
    def pid(self) -> int:
        return self.process.pid if self.process and self.state in PROCESS_STATES else 0

    @property
    def restarts(self) -> int:
        """Start attempts after the first."""
        return max(self.starts - 1, 0)


@dataclasses.dataclass
class ModelCounts:
    """Per model, only ever growing (metrics): a worker removed by scale-down or reload keeps its counts here."""

    restarts: int = 0
    oom_exits: int = 0
    request_ooms: int = 0
    demand_starts: int = 0   # workers started because requests waited
    idle_stops: int = 0      # workers stopped after keep_alive
    evictions: int = 0       # workers stopped to make room for another model


# Fleet._transition: the only way a worker's state and reason change.
Transition = Callable[[WorkerRecord, WorkerState, str], None]


def workers_of(workers: Iterable[WorkerRecord], model_name: str) -> list[WorkerRecord]:
    return [w for w in workers if w.model.name == model_name]


def staying(workers: Iterable[WorkerRecord], model_name: str) -> list[WorkerRecord]:
    """A model's workers that are not on their way out (scale-down, reload): what scale and demand count as held."""
    return [w for w in workers_of(workers, model_name) if w.after_stop != AfterStop.REMOVE]
