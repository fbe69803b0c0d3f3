"""LitServe peer: workers_per_device N inference processes, each with mpsd's own TorchCausalLM.

Run by benchmarks/peers.py with its own venv's python:
  litserve_app.py --model-dir DIR --replicas N --threads T --port P

Serves, on 127.0.0.1:
  GET  /health   -> "ok" once every inference worker has loaded and warmed its model
  POST /predict  {"prompt", "max_tokens"} -> one NDJSON line per token: {"i", "text"}
Greedy decoding, seed 0, no stop sequences: the figures mpsd's benchmark uses.
LitServe leaves its worker processes behind when only its main process gets
SIGTERM, so the harness ends the whole process group (session).
"""

from __future__ import annotations

import argparse
import sys

import litserve as ls


class CausalLMAPI(ls.LitAPI):
    def __init__(self, model_dir: str, threads: int) -> None:
        super().__init__(stream=True)
        self.model_dir = model_dir
        self.threads = threads

    def setup(self, device) -> None:
        from mpsd.worker.backends.torch_lm import TorchCausalLM
        from mpsd.worker.device import set_torch_threads

        set_torch_threads(self.threads)
        self.model = TorchCausalLM(self.model_dir, "cpu")
        self.model.warm_up()

    def decode_request(self, request):
        from mpsd.generate_params import GenerateParams

        return GenerateParams(prompt=str(request["prompt"]), max_tokens=int(request["max_tokens"]),
                              temperature=0.0, top_p=1.0, seed=0, stop=())

    def predict(self, params):
        from mpsd.worker.backends.base import TokenEvent

        for event in self.model.generate(params, lambda: True):
            if isinstance(event, TokenEvent):
                yield event

    def encode_response(self, events):
        for event in events:
            yield {"i": event.index, "text": event.text}   # LitServe writes a dict as one JSON line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    server = ls.LitServer(CausalLMAPI(args.model_dir, args.threads), accelerator="cpu", devices=1,
                          workers_per_device=args.replicas, timeout=False)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
