"""A protobuf message as plain JSON-ready data: what `mpsctl status --json` prints and the status page's /api/status
serves, field for field (shared, so the CLI and the daemon's edge render one way)."""

from __future__ import annotations

from typing import Any


def to_plain(message) -> dict[str, Any]:
    """Every field, defaults included, with 64-bit integers as JSON numbers (not strings); an `optional` scalar
    left unset is None (null): "the driver gives no temperature" is not 0 degrees."""
    plain: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is None and field.has_presence and not field.is_repeated \
                and not message.HasField(field.name):
            plain[field.name] = None
        elif field.message_type and field.message_type.GetOptions().map_entry:
            plain[field.name] = {k: _scalar_or_plain(v) for k, v in value.items()}
        elif field.is_repeated:
            plain[field.name] = [_scalar_or_plain(v) for v in value]
        else:
            plain[field.name] = _scalar_or_plain(value)
    return plain


def _scalar_or_plain(value):
    return to_plain(value) if hasattr(value, "DESCRIPTOR") else value
