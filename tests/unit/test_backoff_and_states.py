import random

import pytest
from mpsd.supervisor.fleet.backoff import RestartPolicy, restart_delay, should_give_up
from mpsd.supervisor.fleet.states import IllegalTransition, WorkerState, check_transition


def test_delay_doubles_from_half_a_second_to_the_cap():
    policy = RestartPolicy(jitter=0.0)
    assert [restart_delay(n, policy) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert restart_delay(50, policy) == 30.0


def test_jitter_stays_within_its_fraction():
    policy = RestartPolicy(jitter=0.2)
    rand = random.Random(1)
    delays = [restart_delay(3, policy, rand) for _ in range(200)]
    assert min(delays) >= 1.6 and max(delays) <= 2.4 and len(set(delays)) > 100


def test_gives_up_after_k_failures_inside_the_window():
    policy = RestartPolicy(max_failures=3, window_s=60)
    assert not should_give_up([0, 10], now=20, policy=policy)
    assert should_give_up([0, 10, 20], now=20, policy=policy)
    assert not should_give_up([0, 10, 100], now=100, policy=policy)


def test_state_names_are_the_upper_case_contract():
    assert [s.value for s in WorkerState] == [
        "PENDING", "STARTING", "READY", "DRAINING", "STOPPED", "BACKOFF", "REFUSED", "OOM", "FATAL",
    ]


def test_illegal_transitions_are_refused():
    check_transition(WorkerState.STARTING, WorkerState.READY)
    with pytest.raises(IllegalTransition):
        check_transition(WorkerState.PENDING, WorkerState.READY)
    with pytest.raises(IllegalTransition):
        check_transition(WorkerState.STOPPED, WorkerState.READY)
