"""Typed getters over a TOML table whose errors say 'FILE: KEY: what is wrong'.

Every error names the file and the key, because the person reading it is
usually looking at a launchd log with no other context.
"""

from __future__ import annotations

import pathlib
from typing import Any

from mpsd.config.schema import ConfigError
from mpsd.units import parse_duration, parse_size


class Reader:
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

    def number(self, table: dict[str, Any], key: str, label: str, default: float) -> float:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(label, f"must be a number, got {value!r}")
        return float(value)

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



def optional_path(value: str | None, base_dir: pathlib.Path) -> pathlib.Path | None:
    return base_dir / pathlib.Path(value).expanduser() if value else None



def split_listen(listen: str) -> tuple[str, int]:
    """HOST:PORT as (host, port); ValueError saying the expected form otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT like '127.0.0.1:7700', got {listen!r}")
    return host, int(port)


def check_listen(reader: Reader, listen: str, key: str) -> None:
    try:
        split_listen(listen)
    except ValueError as exc:
        raise reader.fail(key, str(exc)) from None

