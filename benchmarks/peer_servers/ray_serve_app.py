"""Ray Serve peer: N replicas, each running mpsd's TorchCausalLM engine under mpsd's DecodeScheduler.

Run by benchmarks/peers.py with its own venv's python:
  ray_serve_app.py --model-dir DIR --replicas N --threads T --concurrency C --port P --temp-dir D

Starts a Ray local cluster (address="local": never an existing one), deploys
N replicas behind Serve's HTTP proxy, and serves
  GET  /health    -> "ok" from a replica
  POST /generate  {"prompt", "max_tokens"} -> one NDJSON line per token: {"i", "text"}
Greedy decoding, seed 0, no stop sequences: the figures mpsd's benchmark uses.
Prints "PEER READY" once every replica is up; SIGTERM shuts Ray down.

Why this batching. Ray Serve's own, `@serve.batch`, gathers up to
max_batch_size calls and hands them to one handler call; a streaming batch
handler yields one list per step and the batch ends when the handler
returns, so a request arriving mid-batch waits for the next one (unless
max_concurrent_batches > 1, which would run several batches over one model
at once). That is static batching. Continuous batching, where sequences join
and leave between steps, is better for a decode loop, and Ray Serve lets a
replica run any loop inside it: so each replica runs the same scheduler and
engine an mpsd worker runs (mpsd.worker.scheduler.DecodeScheduler over
TorchCausalLM), and only the serving layer differs. max_ongoing_requests is
the batch's size (mpsd's `concurrency`); Ray's router queues the excess.
A thread per request moves its tokens from the scheduler's queue onto the
replica's event loop (awaiting a blocking get on Ray's small default
executor would let 6 waiting streams stall the rest).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import peer_args  # a sibling module: the harness runs this file as a script

MAX_ONGOING = 256   # as mpsd's queue bound in the benchmark's config

def parse_args(argv=None):
    parser = peer_args.parser()
    parser.add_argument("--temp-dir", required=True)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    return parser.parse_args(argv)


def build_app(args):
    import asyncio

    from ray import serve
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, StreamingResponse

    @serve.deployment(
        num_replicas=args.replicas,
        max_ongoing_requests=MAX_ONGOING,
        ray_actor_options={"num_cpus": min(1.0, args.cpus / args.replicas)},
        health_check_period_s=10,
    )
    class CausalLM:
        def __init__(self, model_dir: str, threads: int, concurrency: int) -> None:
            from mpsd.worker.backends.torch_lm import TorchCausalLM
            from mpsd.worker.device import set_torch_threads
            from mpsd.worker.scheduler import DecodeScheduler

            set_torch_threads(threads)
            self._scheduler = DecodeScheduler(TorchCausalLM(model_dir, "cpu"), concurrency)
            self._scheduler.start()
            list(self._scheduler.submit(_params("Hello", 4)))   # warm up

        async def __call__(self, request: Request):
            if request.method == "GET":
                return PlainTextResponse("ok")
            body = await request.json()
            submission = self._scheduler.submit(_params(str(body["prompt"]), int(body["max_tokens"])))
            return StreamingResponse(self._lines(submission), media_type="application/x-ndjson")

        async def _lines(self, submission):
            from mpsd.worker.backends.base import TokenEvent

            loop = asyncio.get_running_loop()
            events: asyncio.Queue = asyncio.Queue()

            def pump() -> None:
                try:
                    for event in submission:
                        loop.call_soon_threadsafe(events.put_nowait, event)
                except Exception as exc:  # noqa: BLE001 - handed to the stream, which raises it
                    loop.call_soon_threadsafe(events.put_nowait, exc)
                loop.call_soon_threadsafe(events.put_nowait, None)

            threading.Thread(target=pump, daemon=True).start()
            try:
                while (event := await events.get()) is not None:
                    if isinstance(event, Exception):
                        raise event
                    if isinstance(event, TokenEvent):
                        yield json.dumps({"i": event.index, "text": event.text}) + "\n"
            finally:
                submission.cancel()

    return CausalLM.bind(args.model_dir, args.threads, args.concurrency)


def _params(prompt: str, max_tokens: int):
    from mpsd.generate_params import GenerateParams

    return GenerateParams(prompt=prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=())


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
