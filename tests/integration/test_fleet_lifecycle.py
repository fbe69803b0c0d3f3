"""Keeping the fleet alive within memory: crashes, OOM, admission from a file probe, scaling, hung workers."""

import os
import signal
import subprocess
import sys

import grpc
import numpy as np
import pytest

from mpsd.v1 import inference_pb2
from support import wait_for, write_probe

FAST_RESTARTS = """
[daemon]
restart_delay = "0.1s"
restart_max_delay = "0.2s"
fatal_failures = 3
fatal_window = "2m"
health_interval = "0.3s"
health_timeout = "1.5s"
"""
GiB = 1024**3


def module_model(name, factory, replicas=1, extra=""):
    return f"""
[[models]]
name = "{name}"
backend = "torch-module"
factory = "fixtures.tiny_modules:{factory}"
replicas = {replicas}
threads = 1
{extra}
"""


def mpsctl(daemon, *args):
    return subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir), *args],
                          capture_output=True, text=True, timeout=60)


def states(daemon, model=None):
    return {w["id"]: w["state"] for w in daemon.status()["workers"] if model is None or w["model"] == model}


def test_a_worker_that_always_crashes_at_start_goes_fatal_after_k_tries_with_its_stderr(make_daemon):
    daemon = make_daemon(FAST_RESTARTS + module_model("crashy", "crash_at_start"))
    worker = wait_for(lambda: (w := daemon.worker("crashy-0"))["state"] == "FATAL" and w, 90, "FATAL")
    assert worker["restarts"] == 2, "three start attempts: the first and two restarts"
    assert "3 failures" in worker["reason"] and "exit code 3" in worker["reason"]
    assert "fixture: native extension crashed while loading" in worker["stderr_tail"]
    shown = mpsctl(daemon, "status", "crashy-0")
    assert "state: FATAL" in shown.stdout and "| fixture: native extension crashed while loading" in shown.stdout
    assert "BACKOFF" in daemon.log()


def test_a_metal_oom_abort_goes_oom_raises_the_footprint_and_retries_once_per_real_memory_change(make_daemon, tmp_path):
    probe = tmp_path / "memory.json"  # fixed numbers: this host's free memory moves by more than 64 MiB at random
    write_probe(probe, budget=8 * GiB, used=2 * GiB)
    daemon = make_daemon(FAST_RESTARTS + f'[memory]\nprobe = "file:{probe}"\n' + module_model("oomy", "metal_oom_at_start"))
    worker = wait_for(lambda: (w := daemon.worker("oomy-0"))["state"] == "OOM" and w, 60, "OOM")
    assert "out of memory" in worker["reason"] and "SIGABRT" in worker["reason"] and "footprint raised" in worker["reason"]
    model = daemon.status()["models"][0]
    assert model["footprint_source"] == "learned" and model["footprint_bytes"] > 512 * 1024**2
    first_raise = model["footprint_bytes"]
    spawned = daemon.log().count("spawned")
    wait_for(lambda: daemon.worker("oomy-0")["state"] == "OOM" and daemon.log().count("spawned") == spawned and
             daemon.worker("oomy-0")["state_age_s"] > 3, 10, "the OOM state to hold without restarts")
    assert daemon.worker("oomy-0")["restarts"] == 0

    write_probe(probe, budget=8 * GiB, used=0)  # 2 GiB freed: one more attempt, which hits the same wall
    wait_for(lambda: daemon.log().count("spawned") == spawned + 1 and daemon.worker("oomy-0")["state"] == "OOM",
             60, "one retry ending in OOM again")
    assert "trying once more" in daemon.log()
    assert daemon.status()["models"][0]["footprint_bytes"] > first_raise
    wait_for(lambda: daemon.worker("oomy-0")["state_age_s"] > 3, 10, "the second OOM to hold")
    assert daemon.log().count("spawned") == spawned + 1, "no loop after the retry"


def test_an_oom_inside_a_request_fails_that_request_and_raises_the_footprint(make_daemon):
    daemon = make_daemon(module_model("guarded", "oom_on_negative"))
    daemon.wait_ready(1)
    before = daemon.status()["models"][0]["footprint_bytes"]
    x = -np.ones((1, 4), dtype=np.float32)
    request = inference_pb2.PredictRequest(model="guarded", inputs={
        "input": inference_pb2.Tensor(dtype="float32", shape=[1, 4], data=x.tobytes())})
    with pytest.raises(grpc.RpcError) as error:
        daemon.inference().Predict(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "MPS backend out of memory" in error.value.details()
    worker = daemon.worker("guarded-0")
    assert worker["state"] == "READY" and worker["oom_events"] == 1
    assert daemon.status()["models"][0]["footprint_bytes"] >= before * 1.25 * 0.99
    assert "out of memory inside a request" in daemon.log()


def test_file_probe_admits_what_fits_refuses_the_rest_and_admits_them_when_memory_frees(make_daemon, tmp_path):
    probe = tmp_path / "memory.json"
    write_probe(probe, budget=int(2.5 * GiB))
    daemon = make_daemon(f"""
[memory]
probe = "file:{probe}"
""" + module_model("mlp", "seeded_linear", replicas=4, extra='footprint = "1GiB"'))
    wait_for(lambda: sorted(states(daemon).values()) == ["READY", "READY", "REFUSED", "REFUSED"], 60, "2 READY, 2 REFUSED")
    refused = [w for w in daemon.status()["workers"] if w["state"] == "REFUSED"]
    assert refused[0]["reason"] == "needs 1.0GiB, 512.0MiB free of 2.5GiB budget after 0B headroom"
    text = mpsctl(daemon, "status").stdout
    assert "REFUSED: needs 1.0GiB" in text and "1.0GiB (configured)" in text and "file:" in text
    write_probe(probe, budget=int(4.5 * GiB), used=2 * GiB)  # the probe counts our two workers; room for two more
    wait_for(lambda: sorted(states(daemon).values()) == ["READY"] * 4, 60, "all four READY")

    # Scale down and up at runtime.
    result = mpsctl(daemon, "scale", "mlp", "1")
    assert result.returncode == 0 and "4 -> 1 replicas" in result.stdout
    wait_for(lambda: list(states(daemon).values()) == ["READY"], 30, "one worker left")
    result = mpsctl(daemon, "scale", "mlp", "2")
    assert result.returncode == 0 and "added mlp-4" in result.stdout
    wait_for(lambda: sorted(states(daemon).values()) == ["READY", "READY"], 30, "two workers again")
    bad = mpsctl(daemon, "scale", "nope", "2")
    assert bad.returncode == 1 and "no model named 'nope'" in bad.stderr


def test_a_hung_worker_is_killed_and_replaced(make_daemon):
    daemon = make_daemon(FAST_RESTARTS + module_model("mlp", "seeded_linear"))
    daemon.wait_ready(1)
    pid = daemon.worker("mlp-0")["pid"]
    os.kill(pid, signal.SIGSTOP)  # still alive, answers nothing
    try:
        worker = wait_for(lambda: (w := daemon.worker("mlp-0"))["state"] == "READY" and w["pid"] != pid and w, 60,
                          "a replacement")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "killed as hung" in worker["last_exit"] and worker["restarts"] == 1


def test_restart_drain_and_reload(make_daemon):
    daemon = make_daemon(module_model("mlp", "seeded_linear"))
    daemon.wait_ready(1)
    first = daemon.worker("mlp-0")["pid"]
    assert mpsctl(daemon, "restart", "mlp-0").returncode == 0
    wait_for(lambda: (w := daemon.worker("mlp-0"))["state"] == "READY" and w["pid"] != first, 60, "a fresh mlp-0")
    daemon.config_path.write_text(daemon.config_path.read_text() + module_model("other", "seeded_linear"))
    kept = daemon.worker("mlp-0")["pid"]
    result = mpsctl(daemon, "reload")
    assert result.returncode == 0 and "added other" in result.stdout, result.stderr
    wait_for(lambda: states(daemon) == {"mlp-0": "READY", "other-0": "READY"}, 60, "the added model")
    assert daemon.worker("mlp-0")["pid"] == kept, "an unchanged model's worker is untouched"
    drained = mpsctl(daemon, "drain", "other-0")
    assert drained.returncode == 0
    wait_for(lambda: daemon.worker("other-0")["state"] == "STOPPED", 30, "other-0 STOPPED")
    assert mpsctl(daemon, "drain", "other-0").returncode == 1
