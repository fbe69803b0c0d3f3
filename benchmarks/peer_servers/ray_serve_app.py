"""Ray Serve peer: N replicas of mpsd's own TorchCausalLM behind Serve's HTTP proxy.

Run by benchmarks/peers.py with its own venv's python:
  ray_serve_app.py --model-dir DIR --replicas N --threads T --port P --temp-dir D

Starts a Ray local cluster (address="local": never an existing one), deploys
one replica per requested worker (max_ongoing_requests=1, as mpsd's
concurrency = 1), and serves
  GET  /health    -> "ok" from a replica
  POST /generate  {"prompt", "max_tokens"} -> one NDJSON line per token: {"i", "text"}
Greedy decoding, seed 0, no stop sequences: the figures mpsd's benchmark uses.
Prints "PEER READY" once every replica is up; SIGTERM shuts Ray down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--replicas", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def build_app(args):
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse

    @serve.deployment(
        num_replicas=args.replicas,
        max_ongoing_requests=1,
        ray_actor_options={"num_cpus": min(1.0, args.cpus / args.replicas)},
        health_check_period_s=10,
    )
    class CausalLM:
        def __init__(self, model_dir: str, threads: int) -> None:
            from mpsd.worker.backends.torch_lm import TorchCausalLM
            from mpsd.worker.device import set_torch_threads

            set_torch_threads(threads)
            self._model = TorchCausalLM(model_dir, "cpu")
            self._model.warm_up()

        async def __call__(self, request: Request):
            if request.method == "GET":
                return PlainTextResponse("ok")
            body = await request.json()
            return StreamingResponse(self._stream(str(body["prompt"]), int(body["max_tokens"])),
                                     media_type="application/x-ndjson")

        def _stream(self, prompt: str, max_tokens: int):
            """Starlette drives this sync generator from a thread pool, one next() per chunk, each on any
            thread; torch's inference mode is per thread, so each decode step enters it on its own
            (holding it across yields fails: 'Inference tensors cannot be saved for backward')."""
            import torch
            from mpsd.generate_params import GenerateParams
            from mpsd.worker.backends.base import TokenEvent

            params = GenerateParams(prompt=prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=())
            events = self._model.generate(params, lambda: True)
            try:
                while True:
                    with torch.inference_mode():
                        event = next(events, None)
                    if event is None:
                        return
                    if isinstance(event, TokenEvent):
                        yield json.dumps({"i": event.index, "text": event.text}) + "\n"
            finally:
                with torch.inference_mode():
                    events.close()

    return CausalLM.bind(args.model_dir, args.threads)


def main(argv=None) -> int:
    args = parse_args(argv)
    stopping = []

    def on_term(signum, frame):
        stopping.append(signum)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    import ray
    from ray import serve

    try:
        ray.init(address="local", num_cpus=max(args.cpus, args.replicas), include_dashboard=False,
                 object_store_memory=128 * 2**20, _temp_dir=args.temp_dir, log_to_driver=True,
                 logging_level="warning")
        serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config={"log_level": "WARNING"})
        started = time.perf_counter()
        serve.run(build_app(args), name="bench", route_prefix="/", blocking=False)
        print(f"PEER READY: {args.replicas} replica(s) in {time.perf_counter() - started:.1f}s", flush=True)
        while True:
            time.sleep(1)
    finally:
        if not stopping:
            # an error, not a SIGTERM to the group: take Ray's own processes down with us
            try:
                serve.shutdown()
            except Exception:  # noqa: BLE001
                pass
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
