"""mpsd under a real supervisord: killed with SIGKILL, brought back, old workers gone, serving again.

Timings are printed (run with -s to see them); nothing is asserted about speed
beyond generous deadlines.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from mpsd.service import shipped
from support import Daemon, data_dir, pid_alive, wait_for

supervisor = pytest.importorskip("supervisor")

SUPERVISORD_CONF = """
[unix_http_server]
file={dir}/supervisor.sock

[supervisord]
logfile={dir}/supervisord.log
pidfile={dir}/supervisord.pid
childlogdir={dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{dir}/supervisor.sock

[include]
files = {include}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervised(Daemon):
    """A Daemon whose process belongs to supervisord, not to the test."""

    def start(self, timeout: float = 30):
        raise NotImplementedError("supervisord starts it")

    def _exited_early(self):
        return None


def test_supervisord_restarts_a_killed_mpsd_with_no_orphans(demo_model, tmp_path):
    port = free_port()
    daemon = Supervised(tmp_path / "mpsd", f"""
[daemon]
listen = "127.0.0.1:{port}"
metrics_listen = "127.0.0.1:0"
http_listen = "127.0.0.1:0"
health_interval = "0.5s"
[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
replicas = 2
threads = 1
""")
    daemon.address = f"127.0.0.1:{port}"
    conf = tmp_path / "supervisord.conf"
    conf.write_text(SUPERVISORD_CONF.format(dir=tmp_path, include=shipped("supervisord", "mpsd.conf")))
    env = dict(os.environ, MPSD_VENV=sys.prefix, MPSD_CONFIG=str(daemon.config_path),
               MPSD_STATE_DIR=str(daemon.state_dir), MPSD_LOG_DIR=str(tmp_path), MPSD_DATA_DIR=str(data_dir()))
    supervisord = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                                   env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        first = wait_for(lambda: _restarted(daemon, None), 120, "mpsd under supervisord with 2 READY workers")
        up_s = time.monotonic() - started
        assert daemon.generate("The", max_tokens=5)[-1].HasField("finish")
        old_daemon, old_workers = first["daemon"]["pid"], [w["pid"] for w in first["workers"]]

        killed_at = time.monotonic()
        os.kill(old_daemon, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in old_workers), 5, "the old workers to exit")
        orphans_gone_s = time.monotonic() - killed_at
        second = wait_for(lambda: _restarted(daemon, old_daemon), 120, "supervisord to restart mpsd with 2 READY workers")
        back_s = time.monotonic() - killed_at
        assert not set(old_workers) & {w["pid"] for w in second["workers"]}
        assert daemon.generate("The", max_tokens=5)[-1].HasField("finish")
        status = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir), "status"],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and status.stdout.count("READY") >= 2
        print(f"\nsupervisord: first fleet READY in {up_s:.1f}s; after SIGKILL of mpsd the old workers were gone in "
              f"{orphans_gone_s:.2f}s and a new mpsd served with 2 READY workers after {back_s:.1f}s")
    finally:
        supervisord.send_signal(signal.SIGTERM)
        try:
            supervisord.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(supervisord.pid, signal.SIGKILL)
        daemon.close()
    log = (tmp_path / "mpsd.log").read_text(errors="replace")
    assert "draining" in log, "supervisord's SIGTERM drained mpsd"


def _restarted(daemon, old_pid):
    try:
        status = daemon.status()
    except Exception:  # the admin socket is down between the kill and the restart
        return None
    ready = [w for w in status["workers"] if w["state"] == "READY"]
    return status if status["daemon"]["pid"] != old_pid and len(ready) == 2 else None
