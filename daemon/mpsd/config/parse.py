"""The config file: TOML in, a validated Config out; the [daemon] and [memory] tables.

[[models]] tables are read by models.py.
"""

from __future__ import annotations

import pathlib
import re
import tomllib
from typing import Any

from mpsd.config.models import read_model
from mpsd.config.reader import Reader, check_listen, optional_path
from mpsd.config.schema import (
    DEVICE_NAME_PATTERN, EMBEDDED_DEFAULT, EMBEDDED_SOURCE, Config, ConfigError, DaemonConfig, DeviceMemoryConfig,
    HttpLimits, MemoryConfig, PublicAccess, RoutingThresholds)

# [daemon] key -> HttpLimits field, for the timeouts (durations); http_max_connections and http_max_body follow them.
HTTP_TIMEOUT_KEYS = {"http_idle_timeout": "idle_timeout_s", "http_head_timeout": "head_timeout_s",
                     "http_body_timeout": "body_timeout_s", "http_send_timeout": "send_timeout_s"}


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
    reader = Reader(source)
    reader.only_keys(raw, "", ("daemon", "memory", "models"))
    daemon = _daemon(reader, reader.table(raw, "daemon"), base_dir)
    memory = _memory(reader, reader.table(raw, "memory"), base_dir)
    raw_models = raw.get("models", [])
    if not isinstance(raw_models, list) or not all(isinstance(m, dict) for m in raw_models):
        raise ConfigError(f"{source}: models: use [[models]] tables")
    if not raw_models:
        raise ConfigError(f"{source}: models: configure at least one [[models]] table")
    models = tuple(read_model(reader, m, i, base_dir) for i, m in enumerate(raw_models))
    names = [m.name for m in models]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: models: the name {name!r} is used twice")
    return Config(daemon=daemon, memory=memory, models=models, source=source)



def _daemon(reader: Reader, table: dict[str, Any], base_dir: pathlib.Path) -> DaemonConfig:
    fields = (
        "listen", "state_dir", "drain_grace", "stop_timeout", "health_interval", "health_timeout", "log_format",
        "restart_delay", "restart_max_delay", "restart_reset_after", "fatal_failures", "fatal_window",
        "log_file", "log_max_size", "log_backups", "tls_cert", "tls_key", "token_file", "metrics_listen",
        "http_listen", *HTTP_TIMEOUT_KEYS, "http_max_connections", "http_max_body", *ROUTING_KEYS, "stream_buffer",
    )
    reader.only_keys(table, "daemon.", fields)
    defaults = DaemonConfig()
    listen = reader.string(table, "listen", "daemon.listen", defaults.listen)
    check_listen(reader, listen, "daemon.listen")
    metrics_listen = reader.string(table, "metrics_listen", "daemon.metrics_listen", defaults.metrics_listen)
    if metrics_listen:
        check_listen(reader, metrics_listen, "daemon.metrics_listen")
    http_listen = reader.string(table, "http_listen", "daemon.http_listen", defaults.http_listen)
    if http_listen:
        check_listen(reader, http_listen, "daemon.http_listen")
    state_dir = reader.string(table, "state_dir", "daemon.state_dir")
    log_format = reader.string(table, "log_format", "daemon.log_format", "text")
    if log_format not in ("text", "json"):
        raise reader.fail("daemon.log_format", f"must be 'text' or 'json', got {log_format!r}")
    return DaemonConfig(
        listen=listen,
        metrics_listen=metrics_listen,
        http_listen=http_listen,
        http_limits=_http_limits(reader, table),
        routing=_routing(reader, table),
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
        log_file=optional_path(reader.string(table, "log_file", "daemon.log_file"), base_dir),
        log_max_bytes=reader.size(table, "log_max_size", "daemon.log_max_size") or defaults.log_max_bytes,
        log_backups=reader.integer(table, "log_backups", "daemon.log_backups", defaults.log_backups, 0),
        stream_buffer=reader.integer(table, "stream_buffer", "daemon.stream_buffer", defaults.stream_buffer, 1),
    )



ROUTING_KEYS = ("routing_cache_threshold", "routing_balance_abs_threshold", "routing_balance_rel_threshold")


def _routing(reader: Reader, table: dict[str, Any]) -> RoutingThresholds:
    defaults = RoutingThresholds()
    cache = reader.number(table, "routing_cache_threshold", "daemon.routing_cache_threshold", defaults.cache_threshold)
    if not 0.0 <= cache <= 1.0:
        raise reader.fail("daemon.routing_cache_threshold", f"must be a fraction from 0 to 1, got {cache!r}")
    relative = reader.number(table, "routing_balance_rel_threshold", "daemon.routing_balance_rel_threshold",
                             defaults.balance_rel_threshold)
    if relative < 1.0:
        raise reader.fail("daemon.routing_balance_rel_threshold", f"must be 1.0 or more, got {relative!r}")
    return RoutingThresholds(
        cache_threshold=cache,
        balance_abs_threshold=reader.integer(table, "routing_balance_abs_threshold",
                                             "daemon.routing_balance_abs_threshold", defaults.balance_abs_threshold, 0),
        balance_rel_threshold=relative)


def _http_limits(reader: Reader, table: dict[str, Any]) -> HttpLimits:
    """A zero would close every connection at once or refuse every body, so each limit must be above 0."""
    defaults = HttpLimits()
    timeouts = {field: reader.duration(table, key, f"daemon.{key}", getattr(defaults, field))
                for key, field in HTTP_TIMEOUT_KEYS.items()}
    max_body = reader.size(table, "http_max_body", "daemon.http_max_body")
    for key, value in (*zip(HTTP_TIMEOUT_KEYS, timeouts.values()), ("http_max_body", max_body)):
        if value is not None and value <= 0:
            raise reader.fail(f"daemon.{key}", f"must be above 0, got {table[key]!r}")
    return HttpLimits(**timeouts, max_body_bytes=max_body or defaults.max_body_bytes,
                      max_connections=reader.integer(table, "http_max_connections", "daemon.http_max_connections",
                                                     defaults.max_connections, 1))


def _access(reader: Reader, table: dict[str, Any], base_dir: pathlib.Path) -> PublicAccess:
    """TLS needs both halves; whether the listen address needs them is decided when serving (--listen may override)."""
    cert, key = (optional_path(reader.string(table, k, f"daemon.{k}"), base_dir) for k in ("tls_cert", "tls_key"))
    if bool(cert) != bool(key):
        raise reader.fail("daemon.tls_key" if cert else "daemon.tls_cert", "tls_cert and tls_key go together: set both or neither")
    token_file = optional_path(reader.string(table, "token_file", "daemon.token_file"), base_dir)
    return PublicAccess(tls_cert=cert, tls_key=key, token_file=token_file)



def _memory(reader: Reader, table: dict[str, Any], base_dir: pathlib.Path) -> MemoryConfig:
    reader.only_keys(table, "memory.", ("probe", "budget", "headroom", "min_residency", "devices"))
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
        devices=_device_memory(reader, reader.table(table, "devices")),
    )


def _device_memory(reader: Reader, table: dict[str, Any]) -> tuple[DeviceMemoryConfig, ...]:
    """[memory.devices."cuda:1"] budget / headroom: one device's own, where the machine's devices differ."""
    devices = []
    for name, entry in table.items():
        at = f'memory.devices."{name}".'
        if not DEVICE_NAME_PATTERN.match(name):
            raise reader.fail(at[:-1], "must name a device as a probe reports it: cpu, mps, cuda:N or a file probe's name")
        if not isinstance(entry, dict):
            raise reader.fail(at[:-1], f"must be a table with budget and/or headroom, got {entry!r}")
        reader.only_keys(entry, at, ("budget", "headroom"))
        devices.append(DeviceMemoryConfig(name, reader.size(entry, "budget", at + "budget"),
                                          reader.size(entry, "headroom", at + "headroom")))
    return tuple(devices)

