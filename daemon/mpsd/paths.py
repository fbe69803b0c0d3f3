"""Where mpsd keeps its sockets (state dir) and built models (data dir).

Both follow the platform's conventions and can be overridden, because a
launchd job, a supervisord program and a test each need their own.
"""

from __future__ import annotations

import os
import pathlib
import sys

ADMIN_SOCKET_NAME = "admin.sock"
# sun_path holds 104 bytes on macOS and 108 on Linux, including the NUL.
MAX_SOCKET_PATH = 103
DEMO_MODEL_REF = "@demo"
MLX_DEMO_MODEL_REF = "@mlx-demo"


def default_state_dir() -> pathlib.Path:
    override = os.environ.get("MPSD_STATE_DIR")
    if override:
        return pathlib.Path(override).expanduser()
    home = pathlib.Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "mpsd"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return pathlib.Path(runtime) / "mpsd"
    return home / ".local" / "state" / "mpsd"


def default_data_dir() -> pathlib.Path:
    override = os.environ.get("MPSD_DATA_DIR")
    if override:
        return pathlib.Path(override).expanduser()
    home = pathlib.Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "mpsd"
    data_home = os.environ.get("XDG_DATA_HOME")
    if data_home:
        return pathlib.Path(data_home) / "mpsd"
    return home / ".local" / "share" / "mpsd"


def demo_model_dir(data_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (data_dir or default_data_dir()) / "models" / "demo-gpt2"


def mlx_demo_model_dir(data_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (data_dir or default_data_dir()) / "models" / "demo-mlx-llama"


def admin_socket_path(state_dir: pathlib.Path) -> pathlib.Path:
    return state_dir / ADMIN_SOCKET_NAME


def check_socket_path(path: pathlib.Path) -> None:
    """Fail early with the path in the message: bind() only says 'invalid argument'."""
    if len(os.fsencode(str(path))) > MAX_SOCKET_PATH:
        raise ValueError(
            f"unix socket path is {len(str(path))} bytes, over the limit of {MAX_SOCKET_PATH}: {path}; "
            "choose a shorter state directory (--state-dir or MPSD_STATE_DIR)"
        )


def ensure_private_dir(path: pathlib.Path) -> pathlib.Path:
    """Creates path (0700) or tightens it: sockets in it carry no other access control."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path
