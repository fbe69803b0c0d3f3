"""The systems `python -m benchmarks predict` measures, each started, called and stopped the same way.

An mpsd daemon with one torch-module worker (called by gRPC), or LitServe with
one inference worker (called by HTTP with JSON). connect() gives each client
its own connection; a call sends one request's rows and returns its outputs.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import time
from typing import Callable

import numpy as np
import psutil

from benchmarks.peer_install import PEERS_DIR, PROJECT, venv_python
from benchmarks.peers import SERVERS_DIR
from benchmarks.predict_models import PredictModel
from benchmarks.servers import ServerProcess

SERVING_LINE = re.compile(r"mpsd \S+ serving ")
Call = Callable[[np.ndarray], np.ndarray]  # one request's rows in, its outputs back


# -- mpsd --------------------------------------------------------------------------------------------------------


def mpsd_config(model: PredictModel, max_batch_size: int, delay_ms: float, threads: int,
                concurrency: int | None = None) -> str:
    """concurrency None: the config's default (1 unbatched, two batches' worth batched). The worker finds the
    factory in this checkout (its PYTHONPATH: the checkout, then mpsd's package as the daemon would put it)."""
    search_path = json.dumps(os.pathsep.join((str(PROJECT), str(PROJECT / "daemon"))))
    return (f'[[models]]\nname = "mlp"\nbackend = "torch-module"\nfactory = "{model.factory}"\n'
            f'replicas = 1\nthreads = {threads}\nqueue = 1024\nmax_batch_size = {max_batch_size}\n'
            f'max_batch_delay = "{delay_ms:g}ms"\nenv = {{ PYTHONPATH = {search_path} }}\n'
            + (f"concurrency = {concurrency}\n" if concurrency else ""))


class MpsdSystem:
    """A daemon serving the MLP; connect() gives a client its own channel (a connection of its own)."""

    def __init__(self, config: str) -> None:
        from benchmarks.daemon_run import RunningDaemon

        self.daemon = RunningDaemon(config)
        self.channels: list = []
        try:
            self._wait_serving(60)
            self.daemon.wait_ready(1, timeout=120)
        except BaseException:
            self.daemon.stop()
            raise

    def _wait_serving(self, timeout_s: float) -> None:
        """The admin socket opens after the public port's line is logged; the daemon says "serving" once it has."""
        deadline = time.monotonic() + timeout_s
        while not SERVING_LINE.search(self.daemon.log()):
            if time.monotonic() > deadline or self.daemon.process.poll() is not None:
                raise RuntimeError(f"mpsd did not start serving: {self.daemon.log()[-1000:]}")
            time.sleep(0.1)

    def connect(self) -> Call:
        import grpc

        from mpsd.v1 import inference_pb2, inference_pb2_grpc
        from mpsd.worker.tensors import to_tensor

        channel = grpc.insecure_channel(self.daemon.address, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)

        def call(rows: np.ndarray) -> np.ndarray:
            reply = stub.Predict(inference_pb2.PredictRequest(model="mlp", inputs={"input": to_tensor(rows)}),
                                 timeout=60)
            tensor = reply.outputs["output"]
            return np.frombuffer(tensor.data, dtype=tensor.dtype).reshape(tuple(tensor.shape))
        return call

    def processes(self) -> dict[str, list]:
        """Whose CPU a reply costs: the daemon, and its worker."""
        daemon = psutil.Process(self.daemon.process.pid)
        return {"daemon": [daemon], "worker": daemon.children(recursive=True)}

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        self.daemon.stop()


# -- LitServe ----------------------------------------------------------------------------------------------------


class LitServeSystem:
    def __init__(self, model: PredictModel, max_batch_size: int, batch_timeout_s: float, threads: int) -> None:
        command = [str(venv_python("litserve")), str(SERVERS_DIR / "litserve_predict_app.py"),
                   "--factory", model.factory, "--max-batch-size", str(max_batch_size),
                   "--batch-timeout", str(batch_timeout_s), "--threads", str(threads)]
        env = {"PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
        self.server = ServerProcess("litserve", command, PEERS_DIR / "litserve" / "predict-server.log", env)

    def connect(self) -> Call:
        port = self.server.port
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

        def call(rows: np.ndarray) -> np.ndarray:
            connection.request("POST", "/predict", body=json.dumps({"input": rows.tolist()}),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:200]!r}")
            return np.asarray(json.loads(body)["output"], dtype=np.float32)
        return call

    def processes(self) -> dict[str, list]:
        """Whose CPU a reply costs: every process of the server (its API server and inference worker)."""
        main = psutil.Process(self.server.process.pid)
        return {"server": [main, *main.children(recursive=True)]}

    def stop(self) -> None:
        self.server.stop()
