"""What an operator sees: mpsctl status and generate, health, reflection, socket permissions."""

import json
import os
import stat
import subprocess
import sys

from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mpsd.backends import BACKENDS


def mpsctl(daemon, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir), *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_status_json_has_the_contracted_shape(shared_daemon):
    shared_daemon.generate("The", max_tokens=3)
    result = mpsctl(shared_daemon, "status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert set(status) >= {"daemon", "models", "memory", "workers"}
    assert status["daemon"]["version"] and status["daemon"]["uptime_s"] > 0
    assert status["memory"]["budget_bytes"] > 0
    assert [m["name"] for m in status["models"]] == ["demo", "slow"] and status["models"][0]["context_length"] == 1024
    assert [m["concurrency"] for m in status["models"]] == [BACKENDS["torch-lm"].default_concurrency, 1], \
        "demo batches at torch-lm's default; slow is set to one slot"
    for worker in status["workers"]:
        assert set(worker) >= {"id", "model", "pid", "state", "reason", "restarts", "inflight", "tokens", "memory_bytes",
                               "running_sequences", "kv_bytes"}
        assert worker["state"] == "READY" and worker["pid"] > 0 and worker["memory_bytes"] > 10_000_000
        assert isinstance(worker["tokens"], int) and worker["device"] == "cpu"
        assert worker["backend_memory_note"]  # CPU torch reports none, and says so
    assert sum(w["tokens"] for w in status["workers"]) >= 3


def test_status_table_and_one_worker(shared_daemon):
    result = mpsctl(shared_daemon, "status")
    assert result.returncode == 0, result.stderr
    assert "WORKER" in result.stdout and "demo-0" in result.stdout and "READY" in result.stdout
    one = mpsctl(shared_daemon, "status", "demo-1")
    assert one.returncode == 0 and "state: READY" in one.stdout
    missing = mpsctl(shared_daemon, "status", "demo-9")
    assert missing.returncode == 1 and "no worker 'demo-9'" in missing.stderr


def test_mpsctl_generate_streams_to_the_terminal(shared_daemon):
    result = mpsctl(shared_daemon, "generate", "The module", "--model", "demo", "--max-tokens", "12", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "12 generated tokens" in result.stderr or "[stop" in result.stderr


def test_mpsctl_reports_errors_without_a_traceback(shared_daemon):
    result = mpsctl(shared_daemon, "generate", "The", "--model", "nope")
    assert result.returncode == 1 and "NOT_FOUND" in result.stderr and "Traceback" not in result.stderr


def test_health_and_reflection_on_the_public_port(shared_daemon):
    channel = shared_daemon.channel()
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "mpsd.v1.Inference", "demo"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert "mpsd.v1.Inference" in names and "grpc.health.v1.Health" in names


def test_admin_socket_is_private(shared_daemon):
    sock = shared_daemon.state_dir / "admin.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(shared_daemon.state_dir).st_mode) == 0o700
    run_dir = shared_daemon.state_dir / "run"  # the workers' sockets
    assert stat.S_IMODE(os.stat(run_dir).st_mode) == 0o700
    entries = list(run_dir.iterdir())
    assert all(stat.S_ISSOCK(os.stat(p).st_mode) for p in entries)
    assert sum(p.suffix == ".sock" for p in entries) == 4
    steps = [p for p in entries if p.suffix == ".steps"]  # a generating worker's Steps socket, beside its own
    assert steps and all(p.with_suffix(".sock") in entries and stat.S_IMODE(os.stat(p).st_mode) == 0o600 for p in steps)
    assert len(steps) + 4 == len(entries)


def test_mpsctl_says_plainly_when_no_daemon_answers(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(tmp_path), "status"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and "no mpsd answers on" in result.stderr and "Traceback" not in result.stderr


def serve(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_bad_config_is_refused_naming_file_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text("[[models]]\nname = 'm'\nbackend = 'torch-lm'\npath = 'x'\nreplicas = -1\n")
    result = serve("--config", str(config), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert f"{config}: models[0] (m).replicas: must be an integer >= 0" in result.stderr


def test_a_second_daemon_on_the_same_state_dir_or_port_is_refused(shared_daemon, tmp_path):
    same_state = serve("--config", str(shared_daemon.config_path), "--state-dir", str(shared_daemon.state_dir),
                       "--listen", "127.0.0.1:0")
    assert same_state.returncode == 1 and "another mpsd is running" in same_state.stderr
    same_port = serve("--config", str(shared_daemon.config_path), "--state-dir", str(tmp_path / "other"),
                      "--listen", shared_daemon.address)
    assert same_port.returncode == 1 and f"cannot listen on {shared_daemon.address}" in same_port.stderr
    assert shared_daemon.status()["daemon"]["listen"] == shared_daemon.address  # the first one is untouched


def test_status_watch_into_a_pipe_prints_one_snapshot_per_refresh(shared_daemon):
    result = mpsctl(shared_daemon, "status", "--watch", "0.2", "--count", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("WORKER  ") == 2 and result.stdout.count("demo-0") == 2
    lines = mpsctl(shared_daemon, "status", "--watch", "0.2", "--count", "2", "--json").stdout.splitlines()
    assert len(lines) == 2 and all(json.loads(line)["workers"] for line in lines)


def run_in_a_terminal(daemon, *args) -> str:
    """Runs mpsctl with a pseudo-terminal as stdout, the way an operator sees it."""
    import pty

    leader, follower = pty.openpty()
    env = dict(os.environ, COLUMNS="220", LINES="50", TERM="xterm-256color")
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir), *args],
                               stdout=follower, stderr=subprocess.PIPE, env=env)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(30) == 0, process.stderr.read()
    return b"".join(chunks).decode(errors="replace")


def test_status_on_a_terminal_is_a_coloured_table_and_watch_redraws_in_place(shared_daemon):
    shown = run_in_a_terminal(shared_daemon, "status")
    assert "\x1b[1;32mREADY" in shown, "READY in bold green"
    assert "WORKER" in shown and "slow-1" in shown
    watched = run_in_a_terminal(shared_daemon, "status", "--watch", "0.2", "--count", "3")
    assert watched.count("slow-1") >= 3 and "\x1b[2K" in watched, "redrawn over the previous frame"


def test_logs_shows_a_workers_recent_stderr(shared_daemon):
    result = mpsctl(shared_daemon, "logs", "demo-0", "-n", "5")
    pid = next(w["pid"] for w in shared_daemon.status()["workers"] if w["id"] == "demo-0")
    assert result.returncode == 0, result.stderr
    assert f"mpsd worker {pid}: ready on" in result.stdout and len(result.stdout.splitlines()) <= 5
    missing = mpsctl(shared_daemon, "logs", "demo-9")
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr and "no worker 'demo-9'" in missing.stderr


ONE_SMALL_MODULE = """
[[models]]
name = "mlp"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
threads = 1
"""


def test_logs_follow_carries_on_across_a_restart(make_daemon):
    from support import wait_for

    daemon = make_daemon(ONE_SMALL_MODULE)
    daemon.wait_ready(1)
    old_pid = daemon.worker("mlp-0")["pid"]
    follower = subprocess.Popen([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir),
                                 "logs", "mlp-0", "-n", "1", "--follow"], stdout=subprocess.PIPE, text=True)
    try:
        assert f"mpsd worker {old_pid}: ready on" in follower.stdout.readline()
        assert mpsctl(daemon, "restart", "mlp-0").returncode == 0
        new_pid = wait_for(lambda: (w := daemon.worker("mlp-0"))["state"] == "READY" and w["pid"] != old_pid and w["pid"],
                           60, "the restarted worker")
        seen = []
        wait_for(lambda: seen.append(follower.stdout.readline()) or f"mpsd worker {new_pid}: ready on" in seen[-1], 30,
                 "the new process's ready line", interval=0)
    finally:
        follower.kill()
        follower.wait(10)
    text = "".join(seen)
    assert f"mpsd worker {old_pid}: stopping" in text and f"--- mlp-0: new process pid {new_pid} ---" in text


def test_json_logs_carry_the_worker_and_its_state(make_daemon):
    import re

    daemon = make_daemon('[daemon]\nlog_format = "json"\n' + ONE_SMALL_MODULE)
    daemon.wait_ready(1)
    assert daemon.terminate() == 0
    grpc_core = re.compile(r"^[IWE]\d{4} ")  # grpc's C core writes its own lines to stderr
    events = [json.loads(line) for line in daemon.log().splitlines() if line and not grpc_core.match(line)]
    transitions = [e for e in events if "state" in e]
    assert [(e["from_state"], e["state"]) for e in transitions] == [
        ("PENDING", "STARTING"), ("STARTING", "READY"), ("READY", "DRAINING"), ("DRAINING", "STOPPED")]
    assert all(e["worker"] == "mlp-0" and e["model"] == "mlp" and e["reason"] for e in transitions)
    assert transitions[0]["pid"] == 0 and all(e["pid"] > 0 for e in transitions[1:]), "no process before the spawn"
    relayed = [e for e in events if e["msg"].startswith("mlp-0 | ")]
    assert relayed and all(e["worker"] == "mlp-0" and e["pid"] == transitions[1]["pid"] for e in relayed)
    assert {e["level"] for e in events} <= {"info", "warning"} and all(e["ts"].endswith("Z") for e in events)
