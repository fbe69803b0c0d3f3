"""The daemon's configuration: TOML in, typed and validated objects out.

Every error names the file and the key, because the person reading it is
usually looking at a launchd log with no other context.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import tomllib
from typing import Any

from mpsd import paths
from mpsd.backends import BACKENDS
from mpsd.units import parse_duration, parse_size

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
FACTORY_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")

EMBEDDED_SOURCE = "<embedded default>"  # Config.source when no file was given
EMBEDDED_DEFAULT = """
# The embedded default: the demo model, built locally on first use, two workers.
[daemon]
listen = "127.0.0.1:7700"

[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = 2
"""


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the file."""


@dataclasses.dataclass(frozen=True)
class PublicAccess:
    """What the public port requires of callers: TLS (cert and key) and a bearer token, each optional on loopback."""

    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None
    token_file: pathlib.Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


@dataclasses.dataclass(frozen=True)
class DaemonConfig:
    listen: str = "127.0.0.1:7700"
    metrics_listen: str = "127.0.0.1:7701"  # Prometheus /metrics over plain HTTP; "" serves none
    http_listen: str = "127.0.0.1:7702"     # the OpenAI-compatible HTTP API, same access rules as listen; "" off
    access: PublicAccess = PublicAccess()
    state_dir: pathlib.Path | None = None
    drain_grace_s: float = 30.0
    stop_timeout_s: float = 10.0
    health_interval_s: float = 1.0
    health_timeout_s: float = 5.0
    log_format: str = "text"
    restart_delay_s: float = 0.5
    restart_max_delay_s: float = 30.0
    restart_reset_after_s: float = 30.0
    fatal_failures: int = 5
    fatal_window_s: float = 120.0
    log_file: pathlib.Path | None = None
    log_max_bytes: int = 10 << 20
    log_backups: int = 5


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    probe: str = "auto"
    budget_bytes: int | None = None
    headroom_bytes: int = 0
    min_residency_s: float = 30.0  # a worker READY for less is never evicted: the anti-thrash rule


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    name: str
    backend: str
    path: str | None = None
    factory: str | None = None
    replicas: int = 1
    device: str = "auto"
    concurrency: int = 1  # parsed configs take the backend's default (backends.py)
    threads: int = 0
    footprint_bytes: int | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    queue_limit: int = 64
    load_timeout_s: float = 300.0
    memory_limit_bytes: int | None = None   # mlx-lm: mx.set_memory_limit
    wired_limit_bytes: int | None = None    # mlx-lm: mx.set_wired_limit
    cache_limit_bytes: int | None = None    # mlx-lm: mx.set_cache_limit
    # Demand (supervisor/demand.py). With only `replicas` given, min = max = replicas: a static fleet, as before.
    min_replicas: int = 1
    max_replicas: int = 1
    keep_alive_s: float | None = 300.0  # idle time before a worker above min_replicas stops; None: never
    priority: int = 0                   # higher is evicted last
    scale_up_queue: int = 1             # queued requests per live worker that start one more

    @property
    def generates(self) -> bool:
        return BACKENDS[self.backend].generates


@dataclasses.dataclass(frozen=True)
class Config:
    daemon: DaemonConfig
    memory: MemoryConfig
    models: tuple[ModelConfig, ...]
    source: str  # file path, or EMBEDDED_SOURCE

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)


def load_config(path: pathlib.Path | None) -> Config:
    """Reads path, or the embedded default (the demo model) when path is None."""
    if path is None:
        return parse_config(EMBEDDED_DEFAULT, source=EMBEDDED_SOURCE, base_dir=pathlib.Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    return parse_config(text, source=str(path), base_dir=path.resolve().parent)


def parse_config(text: str, *, source: str, base_dir: pathlib.Path) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    reader = _Reader(source)
    reader.only_keys(raw, "", ("daemon", "memory", "models"))
    daemon = _daemon(reader, reader.table(raw, "daemon"), base_dir)
    memory = _memory(reader, reader.table(raw, "memory"), base_dir)
    raw_models = raw.get("models", [])
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise ConfigError(f"{source}: models: use [[models]] tables")
    if not raw_models:
        raise ConfigError(f"{source}: models: configure at least one [[models]] table")
    models = tuple(_model(reader, m, i, base_dir) for i, m in enumerate(raw_models))
    names = [m.name for m in models]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: models: the name {name!r} is used twice")
    return Config(daemon=daemon, memory=memory, models=models, source=source)


class _Reader:
    """Typed getters that word errors as 'FILE: KEY: what is wrong'."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key}: {message}")

    def only_keys(self, table: dict[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for key in table:
            if key not in allowed:
                raise self.fail(prefix + key, f"unknown key (known here: {', '.join(allowed)})")

    def table(self, raw: dict[str, Any], key: str) -> dict[str, Any]:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(key, "must be a table")
        return value

    def string(self, table: dict[str, Any], key: str, label: str, default: str | None = None) -> str | None:
        value = table.get(key, default)
        if value is not None and not isinstance(value, str):
            raise self.fail(label, f"must be a string, got {value!r}")
        return value

    def integer(self, table: dict[str, Any], key: str, label: str, default: int, minimum: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(label, f"must be an integer >= {minimum}, got {value!r}")
        return value

    def duration(self, table: dict[str, Any], key: str, label: str, default: float) -> float:
        try:
            return parse_duration(table.get(key, default))
        except ValueError as exc:
            raise self.fail(label, str(exc)) from None

    def size(self, table: dict[str, Any], key: str, label: str) -> int | None:
        if key not in table:
            return None
        try:
            return parse_size(table[key])
        except ValueError as exc:
            raise self.fail(label, str(exc)) from None


def _daemon(reader: _Reader, table: dict[str, Any], base_dir: pathlib.Path) -> DaemonConfig:
    fields = (
        "listen", "state_dir", "drain_grace", "stop_timeout", "health_interval", "health_timeout", "log_format",
        "restart_delay", "restart_max_delay", "restart_reset_after", "fatal_failures", "fatal_window",
        "log_file", "log_max_size", "log_backups", "tls_cert", "tls_key", "token_file", "metrics_listen",
        "http_listen",
    )
    reader.only_keys(table, "daemon.", fields)
    defaults = DaemonConfig()
    listen = reader.string(table, "listen", "daemon.listen", defaults.listen)
    _check_listen(reader, listen, "daemon.listen")
    metrics_listen = reader.string(table, "metrics_listen", "daemon.metrics_listen", defaults.metrics_listen)
    if metrics_listen:
        _check_listen(reader, metrics_listen, "daemon.metrics_listen")
    http_listen = reader.string(table, "http_listen", "daemon.http_listen", defaults.http_listen)
    if http_listen:
        _check_listen(reader, http_listen, "daemon.http_listen")
    state_dir = reader.string(table, "state_dir", "daemon.state_dir")
    log_format = reader.string(table, "log_format", "daemon.log_format", "text")
    if log_format not in ("text", "json"):
        raise reader.fail("daemon.log_format", f"must be 'text' or 'json', got {log_format!r}")
    return DaemonConfig(
        listen=listen,
        metrics_listen=metrics_listen,
        http_listen=http_listen,
        access=_access(reader, table, base_dir),
        state_dir=(base_dir / pathlib.Path(state_dir).expanduser()) if state_dir else None,
        drain_grace_s=reader.duration(table, "drain_grace", "daemon.drain_grace", defaults.drain_grace_s),
        stop_timeout_s=reader.duration(table, "stop_timeout", "daemon.stop_timeout", defaults.stop_timeout_s),
        health_interval_s=reader.duration(table, "health_interval", "daemon.health_interval", defaults.health_interval_s),
        health_timeout_s=reader.duration(table, "health_timeout", "daemon.health_timeout", defaults.health_timeout_s),
        log_format=log_format,
        restart_delay_s=reader.duration(table, "restart_delay", "daemon.restart_delay", defaults.restart_delay_s),
        restart_max_delay_s=reader.duration(table, "restart_max_delay", "daemon.restart_max_delay", defaults.restart_max_delay_s),
        restart_reset_after_s=reader.duration(
            table, "restart_reset_after", "daemon.restart_reset_after", defaults.restart_reset_after_s),
        fatal_failures=reader.integer(table, "fatal_failures", "daemon.fatal_failures", defaults.fatal_failures, 1),
        fatal_window_s=reader.duration(table, "fatal_window", "daemon.fatal_window", defaults.fatal_window_s),
        log_file=_optional_path(reader.string(table, "log_file", "daemon.log_file"), base_dir),
        log_max_bytes=reader.size(table, "log_max_size", "daemon.log_max_size") or defaults.log_max_bytes,
        log_backups=reader.integer(table, "log_backups", "daemon.log_backups", defaults.log_backups, 0),
    )


def _optional_path(value: str | None, base_dir: pathlib.Path) -> pathlib.Path | None:
    return base_dir / pathlib.Path(value).expanduser() if value else None


def _access(reader: _Reader, table: dict[str, Any], base_dir: pathlib.Path) -> PublicAccess:
    """TLS needs both halves; whether the listen address needs them is decided when serving (--listen may override)."""
    cert, key = (_optional_path(reader.string(table, k, f"daemon.{k}"), base_dir) for k in ("tls_cert", "tls_key"))
    if bool(cert) != bool(key):
        raise reader.fail("daemon.tls_key" if cert else "daemon.tls_cert", "tls_cert and tls_key go together: set both or neither")
    token_file = _optional_path(reader.string(table, "token_file", "daemon.token_file"), base_dir)
    return PublicAccess(tls_cert=cert, tls_key=key, token_file=token_file)


def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT as (host, port); ValueError saying the expected form otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT like '127.0.0.1:7700', got {listen!r}")
    return host, int(port)


def _check_listen(reader: _Reader, listen: str, key: str) -> None:
    try:
        split_listen(listen)
    except ValueError as exc:
        raise reader.fail(key, str(exc)) from None


def _memory(reader: _Reader, table: dict[str, Any], base_dir: pathlib.Path) -> MemoryConfig:
    reader.only_keys(table, "memory.", ("probe", "budget", "headroom", "min_residency"))
    probe = reader.string(table, "probe", "memory.probe", "auto")
    if probe not in ("auto", "host", "macos", "nvml") and not re.match(r"^(file:.+|nvml:[0-9]+)$", probe):
        raise reader.fail("memory.probe", f"must be auto, host, macos, nvml, nvml:N or file:PATH, got {probe!r}")
    if probe.startswith("file:"):
        probe = "file:" + str(base_dir / pathlib.Path(probe[5:]).expanduser())
    return MemoryConfig(
        probe=probe,
        budget_bytes=reader.size(table, "budget", "memory.budget"),
        headroom_bytes=reader.size(table, "headroom", "memory.headroom") or 0,
        min_residency_s=reader.duration(table, "min_residency", "memory.min_residency", MemoryConfig.min_residency_s),
    )


_MODEL_KEYS = (
    "name", "backend", "path", "factory", "replicas", "device", "concurrency", "threads",
    "footprint", "env", "queue", "load_timeout", "memory_limit", "wired_limit", "cache_limit",
    "min_replicas", "max_replicas", "keep_alive", "priority", "scale_up_queue",
)


def _model(reader: _Reader, table: dict[str, Any], index: int, base_dir: pathlib.Path) -> ModelConfig:
    at = f"models[{index}]."
    reader.only_keys(table, at, _MODEL_KEYS)
    name = reader.string(table, "name", at + "name")
    if not name or not NAME_PATTERN.match(name):
        raise reader.fail(at + "name", f"must be 1-63 letters, digits, '.', '_' or '-', got {name!r}")
    at = f"models[{index}] ({name})."
    backend = reader.string(table, "backend", at + "backend")
    if backend not in BACKENDS:
        raise reader.fail(at + "backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = reader.string(table, "device", at + "device", "auto")
    if not DEVICE_PATTERN.match(device):
        raise reader.fail(at + "device", f"must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    return ModelConfig(
        name=name,
        backend=backend,
        path=_model_path(reader, table, at, backend, base_dir),
        factory=_model_factory(reader, table, at, backend),
        **_demand(reader, table, at),
        device=device,
        concurrency=reader.integer(table, "concurrency", at + "concurrency", BACKENDS[backend].default_concurrency, 1),
        threads=reader.integer(table, "threads", at + "threads", 0, 0),
        footprint_bytes=reader.size(table, "footprint", at + "footprint"),
        env=_model_env(reader, table, at),
        queue_limit=reader.integer(table, "queue", at + "queue", 64, 0),
        load_timeout_s=reader.duration(table, "load_timeout", at + "load_timeout", 300.0),
        **_mlx_limits(reader, table, at, backend),
    )


def _demand(reader: _Reader, table: dict[str, Any], at: str) -> dict[str, Any]:
    """replicas is the count at start; min/max bound what demand may do. Each refusal names the key."""
    given_min = "min_replicas" in table
    minimum = reader.integer(table, "min_replicas", at + "min_replicas", 1, 0) if given_min else None
    replicas = reader.integer(table, "replicas", at + "replicas", 1 if minimum is None else minimum, 0)
    minimum = replicas if minimum is None else minimum
    # A demand-driven model (min_replicas given) may load on request: at least one worker unless max says 0.
    maximum = reader.integer(table, "max_replicas", at + "max_replicas", max(replicas, minimum, int(given_min)), 0)
    if given_min and minimum > maximum:
        raise reader.fail(at + "min_replicas", f"{minimum} is above max_replicas {maximum}")
    if replicas > maximum:
        raise reader.fail(at + "replicas", f"{replicas} is above max_replicas {maximum}")
    if replicas < minimum:
        raise reader.fail(at + "replicas", f"{replicas} is below min_replicas {minimum}")
    return dict(replicas=replicas, min_replicas=minimum, max_replicas=maximum,
                keep_alive_s=_keep_alive(reader, table, at), priority=reader.integer(
                    table, "priority", at + "priority", 0, -(1 << 31)),
                scale_up_queue=reader.integer(table, "scale_up_queue", at + "scale_up_queue", 1, 1))


def _keep_alive(reader: _Reader, table: dict[str, Any], at: str) -> float | None:
    value = table.get("keep_alive", "5m")
    if value in (-1, "-1"):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise reader.fail(at + "keep_alive", f"must be a duration like '5m', or -1 for never, got {value!r}")
    return reader.duration(table, "keep_alive", at + "keep_alive", 300.0)


def _mlx_limits(reader: _Reader, table: dict[str, Any], at: str, backend: str) -> dict[str, int | None]:
    """Per-worker MLX limits, so several workers can share one Metal budget."""
    limits = {f"{key}_bytes": reader.size(table, key, at + key) for key in ("memory_limit", "wired_limit", "cache_limit")}
    if not BACKENDS[backend].takes_mlx_limits and any(v is not None for v in limits.values()):
        takers = ", ".join(b.name for b in BACKENDS.values() if b.takes_mlx_limits)
        raise reader.fail(at + "memory_limit", f"memory_limit, wired_limit and cache_limit apply to backend {takers} only")
    return limits


def _model_path(reader: _Reader, table: dict[str, Any], at: str, backend: str, base_dir: pathlib.Path) -> str | None:
    path = reader.string(table, "path", at + "path")
    if BACKENDS[backend].needs_path and not path:
        raise reader.fail(at + "path", f"backend {backend} needs the model directory ('@demo' or '@mlx-demo' for the demo models)")
    if path is None or path in (paths.DEMO_MODEL_REF, paths.MLX_DEMO_MODEL_REF):
        return path
    return str(base_dir / pathlib.Path(path).expanduser())


def _model_factory(reader: _Reader, table: dict[str, Any], at: str, backend: str) -> str | None:
    factory = reader.string(table, "factory", at + "factory")
    if BACKENDS[backend].needs_factory and not factory:
        raise reader.fail(at + "factory", f"backend {backend} needs factory = 'package.module:function'")
    if factory and not FACTORY_PATTERN.match(factory):
        raise reader.fail(at + "factory", f"must look like 'package.module:function', got {factory!r}")
    return factory


def _model_env(reader: _Reader, table: dict[str, Any], at: str) -> dict[str, str]:
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise reader.fail(at + "env", "must be a table of string values, e.g. env = { OMP_PROC_BIND = 'true' }")
    return dict(env)
