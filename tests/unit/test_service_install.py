"""launchd plists and `mpsctl install/uninstall`: launchd only shows a bad plist as a job that never starts."""

from __future__ import annotations

import argparse
import os
import pathlib
import plistlib
import re
import subprocess
import sys

import pytest

from mpsd.cli import service_install as si
from mpsd.service import plist as launchd
from mpsd.service import shipped

PYTHON = sys.executable
SAMPLE = dict(mpsd_bin="/opt/mpsd/.venv/bin/mpsd", config="/etc/mpsd/mpsd.toml", log_dir="/Users/ann/Library/Logs/mpsd",
              state_dir="/Users/ann/Library/Application Support/mpsd", home="/Users/ann", user="ann", group="staff",
              workdir="/Users/ann")
REQUIRED = {"Label": str, "ProgramArguments": list, "RunAtLoad": bool, "KeepAlive": dict, "ThrottleInterval": int,
            "ExitTimeOut": int, "ProcessType": str, "StandardOutPath": str, "StandardErrorPath": str,
            "EnvironmentVariables": dict, "WorkingDirectory": str, "SoftResourceLimits": dict}
KINDS = ("agent", "daemon")
PLISTS = pathlib.Path(__file__).resolve().parents[2] / "plists"  # the one copy; the package links to it


def test_every_committed_template_is_a_plist_and_has_one_kind() -> None:
    committed = sorted(p.name for p in PLISTS.glob("*.plist"))
    assert committed == ["io.mpsd.agent.plist", "io.mpsd.daemon.plist"]
    for kind in KINDS:
        assert launchd.template_path(kind) == PLISTS / f"{launchd.LABELS[kind]}.plist"
        assert isinstance(plistlib.loads(launchd.template_path(kind).read_bytes()), dict)


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_template_carries_every_key_with_its_type(kind: launchd.Kind) -> None:
    plist = plistlib.loads(launchd.render_plist(kind, **SAMPLE))
    for key, expected in REQUIRED.items():
        assert type(plist[key]) is expected, key
    assert plist["Label"] == f"io.mpsd.{kind}"
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ExitTimeOut"] > 40  # daemon defaults: drain_grace 30 s + stop_timeout 10 s
    assert plist["ProgramArguments"] == ["/opt/mpsd/.venv/bin/mpsd", "serve", "--config", "/etc/mpsd/mpsd.toml"]
    assert plist["ProgramArguments"][0].startswith("/") and plist["ProgramArguments"][0].endswith("/mpsd")
    assert plist["ProcessType"] in ("Interactive", "Adaptive")
    assert type(plist["SoftResourceLimits"]["NumberOfFiles"]) is int
    assert {"PATH", "HOME", "MPSD_STATE_DIR"} <= set(plist["EnvironmentVariables"])
    assert plist["StandardErrorPath"] == "/Users/ann/Library/Logs/mpsd/mpsd.err.log"
    if kind == "daemon":
        assert (plist["UserName"], plist["GroupName"]) == ("ann", "staff")


@pytest.mark.parametrize("kind", KINDS)
def test_rendered_plist_has_no_placeholder_left(kind: launchd.Kind) -> None:
    rendered = launchd.render_plist(kind, **SAMPLE).decode()
    assert "@" in launchd.template_path(kind).read_text()
    assert not re.search(r"@[A-Z_]+@", rendered)
    assert "@" not in rendered


def test_without_config_program_arguments_carry_no_config_flag() -> None:
    plist = plistlib.loads(launchd.render_plist("agent", **(SAMPLE | {"config": None})))
    assert plist["ProgramArguments"] == ["/opt/mpsd/.venv/bin/mpsd", "serve"]


def test_values_are_xml_escaped() -> None:
    plist = plistlib.loads(launchd.render_plist("agent", **(SAMPLE | {"home": "/Users/a&b <c>"})))
    assert plist["EnvironmentVariables"]["HOME"] == "/Users/a&b <c>"


def test_exit_timeout_is_raised_for_a_long_drain_never_lowered() -> None:
    assert plistlib.loads(launchd.render_plist("agent", **SAMPLE, exit_timeout=100))["ExitTimeOut"] == 100
    assert plistlib.loads(launchd.render_plist("agent", **SAMPLE, exit_timeout=5))["ExitTimeOut"] == 60


def _template_without(kind: launchd.Kind, key: str) -> bytes:
    text = launchd.template_path(kind).read_text()
    pattern = rf"\s*<key>{key}</key>\s*(<(string|integer)>[^<]*</\2>|<true/>|<false/>|<dict>.*?</dict>|<array>.*?</array>)"
    stripped, count = re.subn(pattern, "", text, count=1, flags=re.S)
    assert count == 1
    return stripped.encode()


@pytest.mark.parametrize("key", [*REQUIRED, "UserName", "GroupName"])
def test_a_template_missing_a_key_is_rejected(key: str) -> None:
    with pytest.raises(launchd.PlistError, match=key):
        launchd.render_plist("daemon", **SAMPLE, template=_template_without("daemon", key))


@pytest.mark.parametrize("old, new, message", [
    ("<key>SuccessfulExit</key>\n\t\t<false/>", "<key>SuccessfulExit</key>\n\t\t<true/>", "KeepAlive"),
    ("<integer>60</integer>", "<string>60</string>", "ExitTimeOut"),
    ("<integer>60</integer>", "<integer>30</integer>", "ExitTimeOut"),
    ("<integer>10</integer>", "<string>10</string>", "ThrottleInterval"),
    ("<string>Interactive</string>", "<string>Background</string>", "ProcessType"),
    ("<string>@LOG_DIR@/mpsd.err.log</string>", "<string>mpsd.err.log</string>", "StandardErrorPath"),
    ("<string>@WORKDIR@</string>", "<string>@NOT_A_VALUE@</string>", "placeholders"),
    ("<string>serve</string>", "<integer>1</integer>", "ProgramArguments"),
    ("<key>KeepAlive</key>\n\t<dict>", "<key>KeepAlive</key>\n\t<true/><key>x</key><dict>", "KeepAlive"),
])
def test_a_wrong_value_is_rejected(old: str, new: str, message: str) -> None:
    text = launchd.template_path("agent").read_text()
    assert old in text
    with pytest.raises(launchd.PlistError, match=message):
        launchd.render_plist("agent", **SAMPLE, template=text.replace(old, new, 1).encode())


def test_relative_paths_are_rejected() -> None:
    with pytest.raises(launchd.PlistError, match="absolute"):
        launchd.render_plist("agent", **(SAMPLE | {"config": "mpsd.toml"}))
    with pytest.raises(launchd.PlistError, match="absolute"):
        launchd.render_plist("agent", **(SAMPLE | {"mpsd_bin": ".venv/bin/mpsd"}))


def test_broken_xml_is_rejected() -> None:
    with pytest.raises(launchd.PlistError, match="not a valid plist"):
        launchd.validate_plist(b"<plist><dict><key>Label</key></plist>", "agent")


# ------------------------------------------------- install/uninstall logic, recorded

class RecordingHost:
    """Records what install/uninstall would do to the machine; changes nothing."""

    def __init__(self, *, euid: int = 501, existing: set[pathlib.Path] | None = None,
                 answers: dict[str, int] | None = None) -> None:
        self.calls: list[tuple] = []
        self.written: dict[pathlib.Path, bytes] = {}
        self._euid = euid
        self.existing = set(existing or ())
        self.answers = answers or {}

    def run(self, argv: list[str]) -> tuple[int, str]:
        self.calls.append(("run", *argv))
        return self.answers.get(argv[1], 0), "answer"

    def write_file(self, path: pathlib.Path, data: bytes) -> None:
        self.calls.append(("write", path))
        self.written[path] = data
        self.existing.add(path)

    def remove_file(self, path: pathlib.Path) -> None:
        self.calls.append(("remove", path))
        self.existing.discard(path)

    def make_dir(self, path: pathlib.Path, owner: tuple[str, str] | None = None) -> None:
        self.calls.append(("mkdir", path, owner))

    def exists(self, path: pathlib.Path) -> bool:
        return path in self.existing or path.exists()

    def uid(self) -> int:
        return 501

    def euid(self) -> int:
        return self._euid


@pytest.fixture
def macos(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> pathlib.Path:
    monkeypatch.setenv("MPSD_INSTALL_PLATFORM", "darwin")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SUDO_USER", raising=False)
    return tmp_path


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**({"agent": False, "daemon": False, "dry_run": False, "config": None, "user": None} | kw))


def _config(tmp_path: pathlib.Path, drain: str = "30s") -> pathlib.Path:
    path = tmp_path / "mpsd.toml"
    path.write_text(f'[daemon]\ndrain_grace = "{drain}"\n\n[[models]]\nname = "m"\nbackend = "null-lm"\n')
    return path


def test_install_agent_writes_then_bootstraps_in_the_gui_domain(macos: pathlib.Path) -> None:
    host = RecordingHost()
    assert si.install(_args(agent=True, config=_config(macos)), host) == 0
    target = macos / "Library" / "LaunchAgents" / "io.mpsd.agent.plist"
    assert host.calls == [("mkdir", macos / "Library" / "Logs" / "mpsd", None), ("write", target),
                          ("run", "launchctl", "bootstrap", "gui/501", str(target))]
    plist = plistlib.loads(host.written[target])
    assert plist["ProgramArguments"][1:] == ["serve", "--config", str(macos / "mpsd.toml")]
    assert plist["EnvironmentVariables"]["MPSD_STATE_DIR"] == str(macos / "Library" / "Application Support" / "mpsd")
    assert plist["ProgramArguments"][0] == str(pathlib.Path(sys.executable).absolute().parent / "mpsd")


def test_install_boots_out_a_plist_already_in_place_first(macos: pathlib.Path) -> None:
    target = macos / "Library" / "LaunchAgents" / "io.mpsd.agent.plist"
    host = RecordingHost(existing={target})
    assert si.install(_args(), host) == 0
    assert host.calls[0] == ("run", "launchctl", "bootout", "gui/501/io.mpsd.agent")
    assert host.calls[-1] == ("run", "launchctl", "bootstrap", "gui/501", str(target))


def test_install_raises_exit_timeout_above_a_long_drain(macos: pathlib.Path) -> None:
    host = RecordingHost()
    assert si.install(_args(config=_config(macos, drain="90s")), host) == 0
    (data,) = host.written.values()
    assert plistlib.loads(data)["ExitTimeOut"] > 90 + 10


def test_install_daemon_needs_root_and_runs_as_the_named_user(macos: pathlib.Path, capsys) -> None:
    assert si.install(_args(daemon=True, user="nobody"), RecordingHost(euid=501)) == 1
    assert "sudo" in capsys.readouterr().err
    host = RecordingHost(euid=0, existing={pathlib.Path("/nonexistent")})
    assert si.install(_args(daemon=True, user="nobody"), host) == 0
    target = pathlib.Path("/Library/LaunchDaemons/io.mpsd.daemon.plist")
    assert host.calls[0][:2] == ("mkdir", pathlib.Path("/Library/Logs/mpsd")) and host.calls[0][2][0] == "nobody"
    assert host.calls[-1] == ("run", "launchctl", "bootstrap", "system", str(target))
    assert plistlib.loads(host.written[target])["UserName"] == "nobody"


def test_install_refuses_root_as_the_daemon_user_and_sudo_for_the_agent(macos: pathlib.Path) -> None:
    host = RecordingHost(euid=0)
    assert si.install(_args(daemon=True, user="root"), host) == 1
    assert si.install(_args(agent=True), host) == 1
    assert host.calls == []


def test_install_refuses_a_missing_or_invalid_config_and_writes_nothing(macos: pathlib.Path, capsys) -> None:
    host = RecordingHost()
    assert si.install(_args(config=macos / "absent.toml"), host) == 1
    (macos / "bad.toml").write_text("[daemon]\nnonsense = 1\n")
    assert si.install(_args(config=macos / "bad.toml"), host) == 1
    assert host.calls == []
    assert "absent.toml does not exist" in capsys.readouterr().err


def test_install_reports_a_failed_bootstrap(macos: pathlib.Path, capsys) -> None:
    assert si.install(_args(), RecordingHost(answers={"bootstrap": 5})) == 1
    assert "bootstrap failed (5)" in capsys.readouterr().err


def test_uninstall_boots_out_then_removes_the_plist(macos: pathlib.Path) -> None:
    target = macos / "Library" / "LaunchAgents" / "io.mpsd.agent.plist"
    host = RecordingHost(existing={target})
    assert si.uninstall(_args(), host) == 0
    assert host.calls == [("run", "launchctl", "bootout", "gui/501/io.mpsd.agent"), ("remove", target)]


def test_uninstall_of_a_job_not_loaded_still_removes_the_file(macos: pathlib.Path) -> None:
    target = pathlib.Path("/Library/LaunchDaemons/io.mpsd.daemon.plist")
    host = RecordingHost(euid=0, existing={target}, answers={"bootout": 113})
    assert si.uninstall(_args(daemon=True), host) == 0
    assert host.calls == [("run", "launchctl", "bootout", "system/io.mpsd.daemon"), ("remove", target)]


# ----------------------------------------------------------- the real CLI

def _mpsctl(*argv: str, platform: str | None, home: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MPSD_INSTALL_PLATFORM", "SUDO_USER")}
    env["HOME"] = str(home)
    if platform:
        env["MPSD_INSTALL_PLATFORM"] = platform
    return subprocess.run([PYTHON, "-m", "mpsd.cli.mpsctl", *argv], capture_output=True, text=True, env=env, timeout=60)


def _printed_plist(stdout: str) -> dict:
    match = re.search(r"<\?xml.*?</plist>", stdout, re.S)
    assert match, stdout
    return plistlib.loads(match.group(0).encode())


def test_cli_install_agent_dry_run_prints_plist_path_and_commands(tmp_path: pathlib.Path) -> None:
    done = _mpsctl("install", "--agent", "--dry-run", "--config", str(_config(tmp_path)), platform="darwin", home=tmp_path)
    assert done.returncode == 0, done.stderr
    plist = _printed_plist(done.stdout)
    assert plist["ProgramArguments"][-2:] == ["--config", str(tmp_path / "mpsd.toml")]
    target = tmp_path / "Library" / "LaunchAgents" / "io.mpsd.agent.plist"
    assert str(target) in done.stdout
    assert f"launchctl bootstrap gui/{os.getuid()} {target}" in done.stdout
    assert f"launchctl load -w {target}" in done.stdout
    assert "kickstart -k" in done.stdout and "launchctl print" in done.stdout
    assert not (tmp_path / "Library").exists()  # a dry run touches nothing


def test_cli_install_daemon_dry_run_targets_the_system_domain(tmp_path: pathlib.Path) -> None:
    done = _mpsctl("install", "--daemon", "--user", "nobody", "--dry-run", platform="darwin", home=tmp_path)
    assert done.returncode == 0, done.stderr
    plist = _printed_plist(done.stdout)
    assert plist["UserName"] == "nobody" and plist["ProgramArguments"][1:] == ["serve"]
    assert "/Library/LaunchDaemons/io.mpsd.daemon.plist" in done.stdout
    assert "launchctl bootstrap system /Library/LaunchDaemons/io.mpsd.daemon.plist" in done.stdout
    assert "embedded demo default" in done.stdout


def test_cli_uninstall_dry_run_prints_bootout(tmp_path: pathlib.Path) -> None:
    done = _mpsctl("uninstall", "--agent", "--dry-run", platform="darwin", home=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"launchctl bootout gui/{os.getuid()}/io.mpsd.agent" in done.stdout


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS install really targets launchd")
def test_cli_install_off_macos_points_at_the_linux_service_files(tmp_path: pathlib.Path) -> None:
    dry = _mpsctl("install", "--dry-run", platform=None, home=tmp_path)
    assert dry.returncode == 0
    assert "macOS-only" in dry.stdout
    systemd, supervisord = shipped("systemd", "mpsd.service"), shipped("supervisord", "mpsd.conf")
    assert systemd.is_file() and supervisord.is_file()
    assert str(systemd) in dry.stdout and str(supervisord) in dry.stdout
    assert "<plist" not in dry.stdout
    real = _mpsctl("install", platform="linux", home=tmp_path)
    assert real.returncode == 1 and str(systemd) in real.stdout
    assert not (tmp_path / "Library").exists()


def test_install_refuses_when_no_mpsd_script_sits_next_to_python(macos: pathlib.Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(si.sys, "executable", str(macos / "bin" / "python"))
    host = RecordingHost()
    assert si.install(_args(), host) == 1
    assert host.calls == [] and "mpsd does not exist" in capsys.readouterr().err
