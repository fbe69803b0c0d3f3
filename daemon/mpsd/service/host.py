"""Everything `mpsctl install`/`uninstall` does to the machine, behind one seam.

Tests swap in a recorder; `--dry-run` swaps in a host that reads the machine
as it is but prints each change instead of making it.
"""

from __future__ import annotations

import grp
import os
import pathlib
import pwd
import shlex
import subprocess
from typing import Protocol


class Host(Protocol):
    """The calls install and uninstall make: files, directories, ids and `launchctl`."""

    def run(self, argv: list[str]) -> tuple[int, str]: ...
    def write_file(self, path: pathlib.Path, data: bytes) -> None: ...
    def remove_file(self, path: pathlib.Path) -> None: ...
    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None: ...
    def exists(self, path: pathlib.Path) -> bool: ...
    def uid(self) -> int: ...
    def euid(self) -> int: ...


class RealHost:
    """The machine itself."""

    def run(self, argv: list[str]) -> tuple[int, str]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True)
        except FileNotFoundError:
            return 127, f"{argv[0]}: not found (launchd exists only on macOS)"
        return done.returncode, (done.stdout + done.stderr).strip()

    def write_file(self, path: pathlib.Path, data: bytes) -> None:
        """Writes beside and renames, so launchd never reads half a plist."""
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        os.chmod(partial, 0o644)  # launchd ignores plists writable by others
        os.replace(partial, path)

    def remove_file(self, path: pathlib.Path) -> None:
        path.unlink(missing_ok=True)

    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if owner:
            os.chown(path, pwd.getpwnam(owner[0]).pw_uid, grp.getgrnam(owner[1]).gr_gid)

    def exists(self, path: pathlib.Path) -> bool:
        return path.exists()

    def uid(self) -> int:
        return os.getuid()

    def euid(self) -> int:
        return os.geteuid()


class DryRunHost(RealHost):
    """Reads the machine as it is, prints every change instead of making it."""

    def run(self, argv: list[str]) -> tuple[int, str]:
        print(f"would run: {shlex.join(argv)}")
        return 0, ""

    def write_file(self, path: pathlib.Path, data: bytes) -> None:
        print(f"would write {path}:")
        print(data.decode(), end="" if data.endswith(b"\n") else "\n")

    def remove_file(self, path: pathlib.Path) -> None:
        print(f"would remove {path}")

    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None:
        print(f"would create directory {path}" + (f" owned by {owner[0]}:{owner[1]}" if owner else ""))
