"""The service definitions: the Linux ones carry the keys the design relies on (systemd-analyze verifies the unit
where present), and a wheel ships every one byte-equal to its top-level file, found by `shipped()` once installed.

The top-level files (plists/, deploy/) are the one copy; mpsd/service/{launchd,systemd,supervisord} link to them
(mpsd/service/__init__.py says why).
"""

import configparser
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from mpsd.service import shipped

ROOT = pathlib.Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "mpsd.service"
# Each service file: where the checkout keeps it, and its place in the package (the arguments to shipped()).
SERVICE_FILES = {
    "plists/io.mpsd.agent.plist": ("launchd", "io.mpsd.agent.plist"),
    "plists/io.mpsd.daemon.plist": ("launchd", "io.mpsd.daemon.plist"),
    "deploy/systemd/mpsd.service": ("systemd", "mpsd.service"),
    "deploy/supervisord/mpsd.conf": ("supervisord", "mpsd.conf"),
}


def read_ini(path: pathlib.Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, inline_comment_prefixes=(";",))
    parser.optionxform = str
    parser.read(path)
    return parser


def test_supervisord_program_restarts_on_crash_and_drains_on_stop():
    program = read_ini(ROOT / "deploy" / "supervisord" / "mpsd.conf")["program:mpsd"]
    assert program["command"].endswith("/bin/mpsd serve --config %(ENV_MPSD_CONFIG)s")
    assert program["autorestart"] == "unexpected" and program["exitcodes"] == "0"
    assert program["stopsignal"] == "TERM" and int(program["stopwaitsecs"]) >= 40  # drain_grace 30 + stop_timeout 10
    assert program["stopasgroup"] == "true" and int(program["startsecs"]) >= 1 and int(program["startretries"]) >= 1


def test_systemd_unit_keys():
    service = read_ini(UNIT)["Service"]
    assert service["Restart"] == "on-failure" and service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) >= 40 and service["ExecStart"].split()[1:3] == ["serve", "--config"]
    assert service["RuntimeDirectoryMode"] == "0700"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    unit = tmp_path / "mpsd.service"
    unit.write_text(UNIT.read_text().replace("/opt/mpsd/.venv/bin/mpsd", str(pathlib.Path(sys.prefix) / "bin" / "mpsd")))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# ------------------------------------------------------------ the wheel

def test_the_package_links_to_the_top_level_files_in_a_checkout():
    for top, parts in SERVICE_FILES.items():
        assert shipped(*parts) == ROOT / top, top
    for folder in ("launchd", "systemd", "supervisord"):
        assert (ROOT / "daemon" / "mpsd" / "service" / folder).is_symlink(), f"{folder} must stay a link, not a copy"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """One wheel, built from a copy of what a checkout holds, so the build writes nothing into the shared tree."""
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for folder in ("daemon", "plists", "deploy"):
        shutil.copytree(ROOT / folder, src / folder, symlinks=True, ignore=skip)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(work / "dist"), str(src)], check=False, capture_output=True, text=True,
                           timeout=170)
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = (work / "dist").glob("mpsd-*.whl")
    return path


def test_the_wheel_holds_each_service_file_byte_equal_to_the_top_level_one(wheel):
    with zipfile.ZipFile(wheel) as archive:
        for top, parts in SERVICE_FILES.items():
            member = archive.getinfo("/".join(("mpsd", "service", *parts)))
            assert (member.external_attr >> 16) & 0o170000 != 0o120000, f"{member.filename} is a link in the wheel"
            assert archive.read(member) == (ROOT / top).read_bytes(), top


def test_shipped_finds_them_in_an_installed_wheel_and_mpsctl_install_uses_them(wheel, tmp_path):
    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--no-compile", "-q",
                                "--target", str(target), str(wheel)], check=False, capture_output=True, text=True,
                               timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    # PYTHONPATH comes before the editable install's path entry, so mpsd is imported from the wheel.
    env = {k: v for k, v in os.environ.items() if k not in ("MPSD_INSTALL_PLATFORM", "SUDO_USER")}
    env.update(PYTHONPATH=str(target), HOME=str(tmp_path))
    probe = ("import sys, mpsd.service as s\n"
             "print(s.__file__)\n"
             f"for parts in {list(SERVICE_FILES.values())!r}:\n"
             "    path = s.shipped(*parts); assert path.is_file(), path; print(path)\n")
    found = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True, env=env,
                           cwd=tmp_path, timeout=60)
    assert found.returncode == 0, found.stderr
    package, *paths = map(pathlib.Path, found.stdout.splitlines())
    assert package.is_relative_to(target), package
    for path, top in zip(paths, SERVICE_FILES, strict=True):
        assert path.is_relative_to(target) and path.read_bytes() == (ROOT / top).read_bytes(), path

    def mpsctl(platform: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "install", "--dry-run"], check=False,
                              capture_output=True, text=True, env=env | {"MPSD_INSTALL_PLATFORM": platform},
                              cwd=tmp_path, timeout=60)

    linux = mpsctl("linux")
    assert linux.returncode == 0, linux.stderr
    assert str(target / "mpsd" / "service" / "systemd" / "mpsd.service") in linux.stdout
    assert str(target / "mpsd" / "service" / "supervisord" / "mpsd.conf") in linux.stdout
    macos = mpsctl("darwin")  # renders the agent plist from the wheel's template
    assert macos.returncode == 0, macos.stderr
    assert "<key>Label</key>" in macos.stdout and "io.mpsd.agent" in macos.stdout
