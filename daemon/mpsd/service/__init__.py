"""Running mpsd under a service manager: launchd on macOS, systemd or supervisord on Linux.

The service definitions live where a reader of the checkout looks for them:
the launchd plists in top-level ``plists/``, the Linux ones in
``deploy/systemd/`` and ``deploy/supervisord/``. ``launchd``, ``systemd`` and
``supervisord`` in this package are committed symlinks to those folders, so
there is one copy and ``mpsctl install`` finds them everywhere:

* an editable install imports this folder from the checkout; the links resolve;
* a wheel: setuptools copies package data by reading it, so the wheel holds the
  files' contents under ``mpsd/service/`` (no links);
* an sdist holds them as plain files at the same place, so a wheel built from it
  is the same.

Symlinks instead of a build hook copying the files: no setup.py, and an
editable install needs no second lookup path. tests/unit/test_deploy_files.py
builds a wheel and checks each file in it is byte-equal to the top-level one.
"""

from __future__ import annotations

import pathlib
from importlib import resources


def shipped(*parts: str) -> pathlib.Path:
    """A service definition as a file path: service managers are handed paths, never contents.

    Resolved, so that in a checkout the path shown is the top-level file (plists/, deploy/), not the link.
    """
    return pathlib.Path(str(resources.files(__name__).joinpath(*parts))).resolve()
