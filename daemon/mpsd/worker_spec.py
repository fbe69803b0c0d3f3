"""What the daemon asks one worker process to be, shared by both sides.

The spec travels as JSON on the worker's command line (`--spec`). Reading it
back checks every key, so a daemon and worker that disagree fail at boot with
the key named, instead of running on a silent default.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import typing


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    worker_id: str
    socket: str
    backend: str
    parent_pid: int
    model: str = ""  # the configured model's name, for the worker's own answers ("model 'demo' has no chat template")
    path: str | None = None
    factory: str | None = None
    device: str = "auto"
    placed_device: str = ""  # the memory probe's device the daemon placed it on ("cuda:2"), for its stats
    threads: int = 0
    concurrency: int = 1
    max_batch_size: int = 1                     # Predict requests stacked into one forward pass; 1: no batching
    max_batch_delay_s: float = 0.0              # how long the oldest waits for neighbours
    stop_grace_s: float = 5.0
    mlx_memory_limit: int | None = None
    mlx_wired_limit: int | None = None
    mlx_cache_limit: int | None = None
    prefix_cache_bytes: int | None = None      # prefix_cache as a size; with the fraction unset too: no prefix cache
    prefix_cache_fraction: float | None = None  # prefix_cache as a fraction of the worker's measured footprint
    replica: int = 0                            # the N of worker id MODEL-N: {replica} in an engine's command
    engine_command: list[str] | None = None     # backend engine: the server to run, placeholders not yet filled
    engine_health: str = ""                     # its health path; "": /health, falling back to /v1/models
    engine_start_timeout_s: float = 300.0       # how long it may take to answer its health path
    engine_state_dir: str = ""                  # {state}: a private directory of this replica, kept across restarts

    @property
    def steps_socket(self) -> str:
        """Where the worker serves its Steps stream (worker/step_socket.py), beside its gRPC socket."""
        return steps_socket(self.socket)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerSpec:
        """Raises ValueError naming the first unknown, missing or wrongly typed key."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"spec: not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"spec: must be a JSON object, got {raw!r}")
        hints = typing.get_type_hints(cls)
        for key in raw:
            if key not in hints:
                raise ValueError(f"spec key {key!r}: unknown (known: {', '.join(hints)})")
        for field in dataclasses.fields(cls):
            if field.name not in raw:
                if field.default is dataclasses.MISSING:
                    raise ValueError(f"spec key {field.name!r}: missing")
            elif not _matches(raw[field.name], hints[field.name]):
                raise ValueError(f"spec key {field.name!r}: must be {field.type}, got {raw[field.name]!r}")
        return cls(**raw)


def _matches(value: object, hint: object) -> bool:
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, list):  # list[str]: a command line
        return any(typing.get_origin(a) is list and all(isinstance(v, str) for v in value) for a in allowed)
    if isinstance(value, bool):  # JSON true is a Python int, but never a count or a size
        return bool in allowed
    if isinstance(value, int) and float in allowed:  # JSON has one number type: 5 is a fine float
        return True
    return isinstance(value, tuple(a for a in allowed if typing.get_origin(a) is None))


def spec_help() -> str:
    """The worker's --spec help, made from the fields so it lists every key the worker reads."""
    keys = (
        f"{field.name} ({field.type})" if field.default is dataclasses.MISSING
        else f"{field.name} ({field.type}, default {field.default!r})"
        for field in dataclasses.fields(WorkerSpec)
    )
    return "a JSON object with keys: " + ", ".join(keys)


def steps_socket(grpc_socket: str) -> str:
    """The Steps socket of the worker whose gRPC socket is `grpc_socket`: the same name, suffix .steps."""
    path = pathlib.PurePath(grpc_socket)
    return str(path.with_suffix(".steps"))
