"""Parsing of human sizes ("96GiB") and durations ("30s") used in config files.

Internally sizes are bytes and durations seconds; only the edges speak units.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_TIME_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from 123, "8GiB", "512 MB"; ValueError with the accepted forms."""
    return int(_parse(value, "size", _SIZE_UNITS, example="'8GiB'", more="'512MB' or a number of bytes"))


def parse_duration(value: int | float | str) -> float:
    """Seconds from 30, "30s", "500ms", "2m"; ValueError with the accepted forms."""
    return float(_parse(value, "duration", _TIME_UNITS, example="'30s'", more="'500ms' or '2m'"))


def _parse(value: int | float | str, noun: str, units: Mapping[str, float], *,
           example: str, more: str) -> int | float:
    """A bare number is already in base units; a string may name one of `units`."""
    if isinstance(value, bool):  # an int to Python, but `true` in a config file is a mistake
        raise ValueError(f"expected a {noun} like {example}, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a {noun} cannot be negative, got {value!r}")
        return value
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in units:
        raise ValueError(f"expected a {noun} like {example}, {more}, got {value!r}")
    return float(match.group(1)) * units[unit]


def format_bytes(count: int) -> str:
    """Human form for status output: 1.5GiB, 300MiB, 12KiB, 0B."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return f"{count}B"


def format_duration(seconds: float) -> str:
    """Human form for uptimes: 3d4h, 2h05m, 4m07s, 12s."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
