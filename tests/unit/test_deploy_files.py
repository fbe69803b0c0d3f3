"""The Linux service definitions carry the keys the design relies on; systemd-analyze verifies the unit where present."""

import configparser
import pathlib
import shutil
import subprocess
import sys

import pytest

from mpsd.service import shipped

UNIT = shipped("systemd", "mpsd.service")


def read_ini(path: pathlib.Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=False, inline_comment_prefixes=(";",))
    parser.optionxform = str
    parser.read(path)
    return parser


def test_supervisord_program_restarts_on_crash_and_drains_on_stop():
    program = read_ini(shipped("supervisord", "mpsd.conf"))["program:mpsd"]
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
