"""Worker states and which transitions between them are legal.

Imports nothing from mpsd so the API, the CLI and the fleet can all reuse the
string values without pulling in each other.
"""

from __future__ import annotations

import enum


class WorkerState(str, enum.Enum):
    PENDING = "PENDING"      # wants a process; waits for admission
    STARTING = "STARTING"    # process spawned, loading and warming the model
    READY = "READY"          # answers probes; takes requests
    DRAINING = "DRAINING"    # asked to stop; finishing what it has
    STOPPED = "STOPPED"      # stopped on purpose
    BACKOFF = "BACKOFF"      # exited unexpectedly; waits before a restart
    REFUSED = "REFUSED"      # not admitted: memory would not hold it
    OOM = "OOM"              # died of out-of-memory; waits for memory
    FATAL = "FATAL"          # gave up: boot failure or too many fast failures


PROCESS_STATES = frozenset({WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING})
# States from which the worker may still come to serve without an operator.
HOPEFUL_STATES = frozenset({
    WorkerState.PENDING, WorkerState.STARTING, WorkerState.READY,
    WorkerState.BACKOFF, WorkerState.REFUSED, WorkerState.OOM,
})

ALLOWED_TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.PENDING: frozenset({WorkerState.STARTING, WorkerState.REFUSED, WorkerState.STOPPED}),
    WorkerState.STARTING: frozenset({
        WorkerState.READY, WorkerState.DRAINING, WorkerState.BACKOFF, WorkerState.OOM, WorkerState.FATAL,
        WorkerState.STOPPED,
    }),
    WorkerState.READY: frozenset({
        WorkerState.DRAINING, WorkerState.BACKOFF, WorkerState.OOM, WorkerState.FATAL, WorkerState.STOPPED,
    }),
    WorkerState.DRAINING: frozenset({WorkerState.STOPPED}),
    WorkerState.STOPPED: frozenset({WorkerState.PENDING}),
    WorkerState.BACKOFF: frozenset({WorkerState.PENDING, WorkerState.STOPPED, WorkerState.FATAL}),
    WorkerState.REFUSED: frozenset({WorkerState.PENDING, WorkerState.STOPPED}),
    WorkerState.OOM: frozenset({WorkerState.PENDING, WorkerState.STOPPED, WorkerState.FATAL}),
    WorkerState.FATAL: frozenset({WorkerState.PENDING, WorkerState.STOPPED}),
}


class IllegalTransition(RuntimeError):
    """A bug in the fleet: it tried a transition the state machine forbids."""


def check_transition(old: WorkerState, new: WorkerState) -> None:
    if new not in ALLOWED_TRANSITIONS[old]:
        raise IllegalTransition(f"{old.value} -> {new.value} is not a legal worker transition")
