"""Running mpsd under a service manager: launchd on macOS, systemd or supervisord on Linux.

The service definitions ship inside this package (``launchd/``, ``systemd/``,
``supervisord/``), not beside it in the checkout, so that ``mpsctl install``
finds them in an installed wheel too.
"""

from __future__ import annotations

import pathlib
from importlib import resources


def shipped(*parts: str) -> pathlib.Path:
    """A service definition as a file path: service managers are handed paths, never contents."""
    return pathlib.Path(str(resources.files(__name__).joinpath(*parts)))
