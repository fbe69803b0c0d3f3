"""Batched Predict through a real daemon and a real torch-module worker on CPU, over real gRPC.

Concurrent clients' requests are stacked into one forward pass of a small MLP
(max_batch_size): each client gets exactly the rows it would get alone, a
malformed request among them fails alone with INVALID_ARGUMENT, and the
worker's own figures (its Stats, read on its socket) show fewer forward
passes than requests. The batch delay is long (3 s), so a batch closes by
filling up, never by a race with the clock.
"""

import json
import threading

import grpc
import numpy as np
import psutil
import pytest
import torch

from fixtures.tiny_modules import seeded_mlp
from mpsd.v1 import inference_pb2, inference_pb2_grpc, worker_pb2, worker_pb2_grpc
from mpsd.worker.tensors import to_tensor
from support import running_daemon, wait_for

BATCH = 8
CONFIG = f"""
[daemon]
health_interval = "0.5s"

[[models]]
name = "mlp"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_mlp"
replicas = 1
threads = 1
max_batch_size = {BATCH}
max_batch_delay = "3s"
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("mpsd"), CONFIG, 1) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def worker_stats(daemon):
    """The worker's own Stats, from the socket its spec names: exact at once (status shows them from the next
    health probe on)."""
    pid = daemon.status()["workers"][0]["pid"]
    command = psutil.Process(pid).cmdline()
    socket = json.loads(command[command.index("--spec") + 1])["socket"]
    channel = grpc.insecure_channel(f"unix:{socket}")
    stub = worker_pb2_grpc.WorkerStub(channel)
    yield lambda: stub.Stats(worker_pb2.StatsRequest(), timeout=10)
    channel.close()


def request(inputs: np.ndarray) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(model="mlp", inputs={"input": to_tensor(inputs)})


def alone(inputs: np.ndarray) -> np.ndarray:
    """What the model gives these rows in a forward pass of their own, in this process."""
    with torch.inference_mode():
        return seeded_mlp()(torch.from_numpy(inputs)).numpy()


def send_together(daemon, requests: list, timeout: float = 30) -> list:
    """Every request at once, each from a client thread of its own: (code, reply or details) in order."""
    stub = inference_pb2_grpc.InferenceStub(daemon.channel())
    answers: list = [None] * len(requests)
    barrier = threading.Barrier(len(requests))

    def call(index: int) -> None:
        barrier.wait()
        try:
            answers[index] = (grpc.StatusCode.OK, stub.Predict(requests[index], timeout=timeout))
        except grpc.RpcError as exc:
            answers[index] = (exc.code(), exc.details())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout + 10)
    assert all(not thread.is_alive() for thread in threads), "a Predict hung"
    return answers


def output(reply: inference_pb2.PredictResponse) -> np.ndarray:
    tensor = reply.outputs["output"]
    return np.frombuffer(tensor.data, dtype=tensor.dtype).reshape(tuple(tensor.shape))


def rows(seed: int, count: int, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


def test_concurrent_clients_get_their_own_rows_as_if_alone_from_fewer_forward_passes(daemon, worker_stats):
    inputs = [rows(seed, 1 + seed % 3) for seed in range(BATCH)]
    before = worker_stats()
    answers = send_together(daemon, [request(x) for x in inputs])
    after = worker_stats()
    for x, (code, reply) in zip(inputs, answers):
        assert code == grpc.StatusCode.OK, reply
        assert output(reply).shape == (len(x), 3)
        np.testing.assert_allclose(output(reply), alone(x), rtol=1e-5, atol=1e-6)
    assert after.requests - before.requests == BATCH
    passes = after.predict_passes - before.predict_passes
    assert 1 <= passes < BATCH, f"{BATCH} requests ran in {passes} forward passes: no batch formed"
    wait_for(lambda: daemon.status()["workers"][0]["predict_passes"] >= after.predict_passes, 30,
             "status showing the worker's forward passes")


def test_a_malformed_request_fails_alone_and_its_batch_neighbours_are_answered(daemon):
    good = [rows(100 + i, 2) for i in range(BATCH - 1)]
    wrong_width = request(rows(7, 2, width=5))  # stacks with no one: runs alone, the model refuses it
    broken = inference_pb2.PredictRequest(model="mlp", inputs={"input": inference_pb2.Tensor(
        dtype="float32", shape=[2, 8], data=b"\0" * 10)})  # refused before it reaches the batcher
    answers = send_together(daemon, [request(x) for x in good] + [wrong_width, broken])
    for x, (code, reply) in zip(good, answers):
        assert code == grpc.StatusCode.OK, reply
        np.testing.assert_allclose(output(reply), alone(x), rtol=1e-5, atol=1e-6)
    (width_code, width_details), (broken_code, broken_details) = answers[-2:]
    assert width_code == grpc.StatusCode.INVALID_ARGUMENT and "inputs" in width_details, width_details
    assert broken_code == grpc.StatusCode.INVALID_ARGUMENT and "inputs['input'].data" in broken_details


def test_a_deadline_that_passes_while_waiting_for_a_batch_ends_that_request_only(daemon, worker_stats):
    stub = inference_pb2_grpc.InferenceStub(daemon.channel())
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(request(rows(1, 1)), timeout=0.5)  # alone, it waits for neighbours past its deadline
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    inputs = [rows(200 + i, 1) for i in range(BATCH - 1)]  # with the expired one queued: a full batch at once
    for x, (code, reply) in zip(inputs, send_together(daemon, [request(x) for x in inputs])):
        assert code == grpc.StatusCode.OK, reply
        np.testing.assert_allclose(output(reply), alone(x), rtol=1e-5, atol=1e-6)
    wait_for(lambda: worker_stats().inflight == 0, 10, "no Predict left in flight on the worker")
