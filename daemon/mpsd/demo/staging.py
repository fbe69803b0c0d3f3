"""Builds a demo model directory once and installs it atomically, however many builders race.

The build happens in a hidden sibling directory that is renamed into place
only when complete, so a crash never leaves a half model behind, and a lock
file next to the target makes a second concurrent builder wait and then reuse
the first one's result instead of building twice. Both builders go through
here, so both get the lock, the fsync and the clean-up of crashed builds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator

from mpsd.demo.models import DemoModel, DemoModelError, Progress


def build_once(
    demo: DemoModel, out_dir: pathlib.Path | str, build: Callable[[pathlib.Path], None], progress: Progress
) -> pathlib.Path:
    """Runs build(staging) and renames staging to out_dir, unless a complete model is there; returns out_dir."""
    out_dir = pathlib.Path(out_dir).absolute()
    if demo.is_complete(out_dir):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(_lock_path(out_dir)):
        if demo.is_complete(out_dir):
            progress(f"{demo.label}: already built by another process in {out_dir}")
            return out_dir
        _refuse_foreign(demo, out_dir)  # before the build, not after it
        _remove_stale_builds(out_dir)
        _build_and_install(demo, out_dir, build)
    return out_dir


def _lock_path(out_dir: pathlib.Path) -> pathlib.Path:
    # Beside out_dir, not inside it: out_dir itself is replaced by a rename.
    return out_dir.parent / f".{out_dir.name}.lock"


def _temp_prefix(out_dir: pathlib.Path) -> str:
    return f".{out_dir.name}.mpsd-build-"


@contextlib.contextmanager
def exclusive_lock(path: pathlib.Path) -> Iterator[None]:
    """flock, because the kernel drops it when a builder dies, so no stale lock ever blocks. Also what the GGUF
    builder holds while it fetches llama.cpp's converter into the shared cache."""
    # The lock file is never deleted: unlinking it would let two builders lock different inodes.
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_builds(out_dir: pathlib.Path) -> None:
    """Clears what crashed builders left; safe because we hold the lock, so none is still running."""
    # mkdtemp appends exactly 8 characters; matching them keeps other models' temp dirs out.
    pattern = re.compile(re.escape(_temp_prefix(out_dir)) + r"[A-Za-z0-9_]{8}")
    for entry in out_dir.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _build_and_install(demo: DemoModel, out_dir: pathlib.Path | str, build: Callable[[pathlib.Path], None]) -> None:
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
    try:
        build(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other local users
        _fsync_tree(staging)
        _move_into_place(demo, staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _refuse_foreign(demo: DemoModel, out_dir: pathlib.Path) -> None:
    """Only an empty directory or an older build of this model may be replaced; anything else may be a user's data."""
    if not out_dir.exists() or demo.read_marker(out_dir) is not None:
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise DemoModelError(
        f"{out_dir} exists and holds something other than the {demo.label}; remove it or choose another directory"
    )


def _move_into_place(demo: DemoModel, staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    _refuse_foreign(demo, out_dir)
    if demo.read_marker(out_dir) is not None:
        retired = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
        os.replace(out_dir, retired)  # rename(2) onto the empty retired dir; removed below
        shutil.rmtree(retired, ignore_errors=True)
    elif out_dir.exists():
        out_dir.rmdir()  # empty, as _refuse_foreign checked
    os.replace(staging, out_dir)
    _fsync_dir(out_dir.parent)


def _fsync_tree(root: pathlib.Path) -> None:
    # Without this a power cut right after the rename could leave the marker but empty weights.
    for path in root.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
