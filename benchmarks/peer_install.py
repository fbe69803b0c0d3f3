"""Virtual environments for the peer servers (Ray Serve, LitServe), built under benchmarks/.peers/ on first use.

Each is reused while its marker file matches what would be installed; mpsd
itself is installed into each (editable, no dependencies), so a peer can run
mpsd's own engine and decode loop.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from benchmarks import processes

HERE = pathlib.Path(__file__).resolve().parent
PROJECT = HERE.parent
PEERS_DIR = HERE / ".peers"
CONSTRAINTS = PROJECT / "constraints.txt"

BASE_PACKAGES = ("torch==2.13.0", "transformers==5.23.0")
INSTALL_TIMEOUT_S = 600


class PeerError(Exception):
    """One sentence: why this peer has no figures."""


def venv_python(name: str) -> pathlib.Path:
    return PEERS_DIR / name / "bin" / "python"


def _install_spec(packages: tuple[str, ...], base: tuple[str, ...], constrained: bool = True) -> dict:
    return {"packages": [*base, *packages], "constraints": CONSTRAINTS.read_text() if constrained else "",
            "python": sys.version.split()[0], "project": str(PROJECT)}


def ensure_venv(name: str, packages: tuple[str, ...], dist: str, progress,
                base: tuple[str, ...] = BASE_PACKAGES, constrained: bool = True,
                timeout_s: float = INSTALL_TIMEOUT_S, env: dict[str, str] | None = None) -> tuple[str, float]:
    """(installed version of dist, seconds spent installing: 0 when reused). Raises PeerError. base: what goes in
    before packages (torch and transformers, which a peer running mpsd's engine needs; () for one that does not).
    constrained=False leaves out constraints.txt, for a peer that pins its own versions of torch or transformers
    (vLLM); env: added to pip's environment (CMAKE_ARGS for a peer built from source)."""
    root = PEERS_DIR / name
    marker = root / ".mpsd-peer-installed.json"
    spec = _install_spec(packages, base, constrained)
    if env:
        spec["env"] = env
    if marker.is_file() and venv_python(name).exists():
        try:
            recorded = json.loads(marker.read_text())
        except ValueError:
            recorded = {}
        if recorded.get("spec") == spec:
            progress(f"{name}: reusing {root} ({dist} {recorded['version']})")
            return recorded["version"], 0.0
    progress(f"{name}: installing {' '.join(spec['packages'])} into {root} (first use; up to "
             f"{timeout_s / 60:.0f} min)")
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    log = root / "install.log"
    deadline = time.monotonic() + timeout_s
    started = time.perf_counter()
    python = str(venv_python(name))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    steps = [
        ("creating the venv", [_base_python(), "-m", "venv", str(root)]),
        ("pip install", [*pip, *(["-c", str(CONSTRAINTS)] if constrained else []), *spec["packages"]]),
        ("pip install -e mpsd", [*pip, "--no-deps", "-e", str(PROJECT)]),
    ]
    with open(log, "ab") as out:
        for what, command in steps:
            out.write(f"\n$ {' '.join(command)}\n".encode())
            out.flush()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"install took over {timeout_s:.0f}s ({what} not reached)")
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True, cwd=str(root),
                                       env={**os.environ, **env} if env else None)
            try:
                code = process.wait(left)
            except subprocess.TimeoutExpired:
                processes.kill_group(process.pid, 0)
                raise PeerError(f"install timed out after {timeout_s:.0f}s during {what} (log: {log})") from None
            if code != 0:
                raise PeerError(f"{what} failed: {_last_line(log)}")
    version = _dist_version(python, dist)
    seconds = time.perf_counter() - started
    marker.write_text(json.dumps({"spec": spec, "version": version, "install_s": round(seconds, 1)}, indent=1))
    progress(f"{name}: installed {dist} {version} in {seconds:.0f}s")
    return version, seconds


def _base_python() -> str:
    """The interpreter to make peer venvs from: this one's base, so a venv is not nested in a venv."""
    base = pathlib.Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.exists() else sys.executable


def _dist_version(python: str, dist: str) -> str:
    result = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise PeerError(f"{dist} is not importable after install: {last_text_line(result.stderr)}")
    return result.stdout.strip()


def _last_line(path: pathlib.Path) -> str:
    try:
        return last_text_line(path.read_text(errors="replace")) or f"(no output; see {path})"
    except OSError:
        return f"(no log at {path})"


def last_text_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or [""])[-1][:400]
