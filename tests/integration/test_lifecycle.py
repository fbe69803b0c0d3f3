"""Losing processes: deaths mid-stream, boot failures; and Predict. (Drain and daemon deaths under load: tests/reliability.)"""

import os
import signal

import grpc
import numpy as np
import pytest

from mpsd.v1 import inference_pb2
from support import slow_config, wait_for


def worker_pids(daemon) -> list[int]:
    return [w["pid"] for w in daemon.status()["workers"] if w["pid"]]


def test_worker_death_mid_stream_ends_it_with_unavailable_and_it_restarts(make_daemon, slow_model):
    daemon = make_daemon(slow_config(1, slow_model))
    daemon.wait_ready(1)
    pid = worker_pids(daemon)[0]
    call = daemon.inference().Generate(
        inference_pb2.GenerateRequest(model="slow", prompt="The", max_tokens=1000, temperature=0), timeout=120)
    assert not next(call).HasField("finish")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "slow-0" in error.value.details()
    worker = wait_for(lambda: (w := daemon.worker("slow-0"))["state"] == "READY" and w["pid"] != pid and w, 60, "a restarted worker")
    assert worker["restarts"] == 1 and "SIGKILL" in worker["last_exit"]
    assert daemon.generate("The", model="slow", max_tokens=3)[-1].HasField("finish")


def test_a_model_that_cannot_load_goes_fatal_at_once(make_daemon, tmp_path):
    daemon = make_daemon(f"""
[[models]]
name = "broken"
backend = "torch-lm"
path = "{tmp_path / 'no-such-model'}"
""")
    worker = wait_for(lambda: (w := daemon.worker("broken-0"))["state"] == "FATAL" and w, 60, "FATAL")
    assert "config.json" in worker["reason"] and worker["restarts"] == 0
    with pytest.raises(grpc.RpcError) as error:
        daemon.generate("The", model="broken")
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_predict_runs_a_plain_module_from_a_factory(make_daemon):
    import torch

    from fixtures.tiny_modules import seeded_linear

    daemon = make_daemon("""
[[models]]
name = "linear"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
""")
    daemon.wait_ready(1)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = inference_pb2.PredictRequest(model="linear", inputs={
        "input": inference_pb2.Tensor(dtype="float32", shape=[2, 4], data=x.tobytes())})
    reply = daemon.inference().Predict(request, timeout=30)
    out = reply.outputs["output"]
    got = np.frombuffer(out.data, dtype=out.dtype).reshape(tuple(out.shape))
    with torch.no_grad():
        expected = seeded_linear()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    bad = inference_pb2.PredictRequest(model="linear", inputs={
        "input": inference_pb2.Tensor(dtype="float32", shape=[2, 4], data=b"short")})
    with pytest.raises(grpc.RpcError) as error:
        daemon.inference().Predict(bad, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "inputs['input'].data" in error.value.details()
    with pytest.raises(grpc.RpcError) as wrong_verb:
        daemon.generate("The", model="linear")
    assert wrong_verb.value.code() == grpc.StatusCode.FAILED_PRECONDITION
