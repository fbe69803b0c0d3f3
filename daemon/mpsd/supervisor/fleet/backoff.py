"""Restart policy as pure functions: how long to wait, and when to give up.

A worker that keeps dying before it becomes ready is broken, not unlucky;
restarting it forever is what TorchServe users complain of.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class RestartPolicy:
    initial_delay_s: float = 0.5
    max_delay_s: float = 30.0
    jitter: float = 0.2          # +/- this fraction of the delay
    max_failures: int = 5        # failures without reaching READY within the window ...
    window_s: float = 120.0      # ... that make the worker FATAL
    reset_after_s: float = 30.0  # READY this long: the next failure starts the delays afresh

    @classmethod
    def from_config(cls, daemon) -> "RestartPolicy":
        return cls(
            initial_delay_s=daemon.restart_delay_s, max_delay_s=daemon.restart_max_delay_s,
            max_failures=daemon.fatal_failures, window_s=daemon.fatal_window_s,
            reset_after_s=daemon.restart_reset_after_s,
        )


def restart_delay(consecutive_failures: int, policy: RestartPolicy, rand: random.Random | None = None) -> float:
    """0.5, 1, 2, 4 ... capped, with jitter so a fleet does not restart in lockstep."""
    exponent = max(consecutive_failures - 1, 0)
    base = min(policy.initial_delay_s * (2 ** min(exponent, 32)), policy.max_delay_s)
    spread = (rand or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, base * (1 + spread))


def should_give_up(failure_times: Sequence[float], now: float, policy: RestartPolicy) -> bool:
    recent = [t for t in failure_times if now - t <= policy.window_s]
    return len(recent) >= policy.max_failures
