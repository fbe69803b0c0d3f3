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
GGUF_DEMO_MODEL_REF = "@gguf-demo"
# Every demo reference: a config's model path equal to one of these is a reference, not a path to resolve.
DEMO_MODEL_REFS = (DEMO_MODEL_REF, MLX_DEMO_MODEL_REF, GGUF_DEMO_MODEL_REF)


def default_state_dir() -> pathlib.Path:
    return _platform_dir("MPSD_STATE_DIR", "XDG_RUNTIME_DIR", ".local/state")


def default_data_dir() -> pathlib.Path:
    return _platform_dir("MPSD_DATA_DIR", "XDG_DATA_HOME", ".local/share")


def _platform_dir(override_var: str, xdg_var: str, home_fallback: str) -> pathlib.Path:
    """The override first, then the platform's place: macOS keeps both kinds in one, XDG splits them."""
    override = os.environ.get(override_var)
    if override:
        return pathlib.Path(override).expanduser()
    home = pathlib.Path.home()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "mpsd"
    xdg_base = os.environ.get(xdg_var)
    if xdg_base:
        return pathlib.Path(xdg_base) / "mpsd"
    return home / home_fallback / "mpsd"


def demo_model_dir(data_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (data_dir or default_data_dir()) / "models" / "demo-gpt2"


def mlx_demo_model_dir(data_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (data_dir or default_data_dir()) / "models" / "demo-mlx-llama"


def gguf_demo_model_dir(data_dir: pathlib.Path | None = None) -> pathlib.Path:
    return (data_dir or default_data_dir()) / "models" / "demo-gpt2-gguf"


def cache_dir(data_dir: pathlib.Path | None = None) -> pathlib.Path:
    """What a build fetched once and may fetch again (llama.cpp's converter): never a model."""
    return (data_dir or default_data_dir()) / "cache"


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
