"""LitServe peer for `python -m benchmarks predict`: the same MLP, LitServe's own request batching.

Run by benchmarks/predict.py with the litserve venv's python (PYTHONPATH: the checkout, for the model):
  litserve_predict_app.py --factory MODULE:FUNCTION --max-batch-size B --batch-timeout S --threads T --port P

Serves, on 127.0.0.1:
  GET  /health   -> "ok" once the inference worker has loaded the model
  POST /predict  {"input": [[256 floats], ...]} -> {"output": [[16 floats], ...]}

Batching is LitServe's: LitAPI(max_batch_size, batch_timeout) collects up to
B requests for up to S seconds; batch() concatenates their rows (the default
would stack them, adding a dimension the model does not take), predict() runs
one forward pass, unbatch() gives each request its rows back. One inference
worker with T torch threads, as mpsd's one worker gets.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import litserve as ls
import numpy as np
import torch


class MlpAPI(ls.LitAPI):
    def __init__(self, factory: str, threads: int, max_batch_size: int, batch_timeout: float) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.factory = factory
        self.threads = threads

    def setup(self, device) -> None:
        module_name, _, attr = self.factory.partition(":")
        torch.set_num_threads(self.threads)
        self.model = getattr(importlib.import_module(module_name), attr)().eval()

    def decode_request(self, request):
        return np.asarray(request["input"], dtype=np.float32)

    def batch(self, inputs):
        self.rows = [len(x) for x in inputs]
        return np.concatenate(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).numpy()

    def unbatch(self, output):
        return np.split(output, np.cumsum(self.rows)[:-1])

    def encode_response(self, output):
        return {"output": output.tolist()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--factory", required=True)
    parser.add_argument("--max-batch-size", type=int, required=True)
    parser.add_argument("--batch-timeout", type=float, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    api = MlpAPI(args.factory, args.threads, args.max_batch_size, args.batch_timeout)
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1, timeout=False)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
