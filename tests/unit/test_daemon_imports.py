"""The daemon side must never import torch or mlx (they would initialise Metal/CUDA in the supervisor)."""

import pkgutil
import subprocess
import sys


def daemon_modules() -> list[str]:
    """Every top-level module (the contracts both sides share) and every module of the daemon's packages."""
    import mpsd

    names = ["mpsd"] + [f"mpsd.{m.name}" for m in pkgutil.iter_modules(mpsd.__path__) if not m.ispkg]
    names += ["mpsd.demo", "mpsd.demo.models", "mpsd.demo.staging", "mpsd.demo.cli"]  # what the daemon reads of a build
    for package in ("mpsd.config", "mpsd.supervisor", "mpsd.cli", "mpsd.v1", "mpsd.service"):
        module = __import__(package, fromlist=["_"])
        names += [package] + [m.name for m in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    return names


def test_daemon_modules_do_not_import_torch_or_mlx():
    modules = daemon_modules()
    assert "mpsd.supervisor.daemon" in modules and "mpsd.cli.mpsctl" in modules
    assert "mpsd.supervisor.fleet.fleet" in modules and "mpsd.supervisor.edge.http.server" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlx', 'transformers'))\n"
        "print(','.join(bad))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"daemon side imported: {result.stdout}"
