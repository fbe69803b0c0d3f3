"""LitServe peer: LitServe's own continuous batching loop driving mpsd's TorchCausalLM engine.

Run by benchmarks/peers.py with its own venv's python:
  litserve_app.py --model-dir DIR --replicas N --threads T --concurrency C --port P

Serves, on 127.0.0.1:
  GET  /health   -> "ok" once every inference worker has loaded and warmed its model
  POST /predict  {"prompt", "max_tokens"} -> one NDJSON line per token: {"i", "text"}
Greedy decoding, seed 0, no stop sequences: the figures mpsd's benchmark uses.

Why this batching. LitServe 0.2.19 offers two: `max_batch_size` /
`batch_timeout` with stream=True (BatchedStreamingLoop) collects a batch and
runs predict() on it until every member ends, so a request that arrives
meanwhile waits for the whole batch, and the batch decodes as slowly as its
longest member; and ContinuousBatchingLoop, where the LitAPI's step() makes
one token for every active sequence and requests join and leave between
steps. The second is LitServe's best for a decode loop, and it is what mpsd
does, so it is used here, with mpsd's own batched engine (TorchCausalLM:
chunked prefill, one left-padded KV cache) doing each step: only the serving
layer differs. `max_batch_size` caps the sequences decoded together (as
mpsd's `concurrency`). has_capacity() always says yes and excess requests
wait here, first come first served: LitServe's loop parks a request that
finds no capacity and looks at it again only after its next 1-second wait
for a new request, which would add up to a second to every queued request.

LitServe leaves its worker processes behind when only its main process gets
SIGTERM, so the harness ends the whole process group (session). Its
continuous batching loop spins (`await asyncio.sleep(0)` in a `while True`)
while no request is active, so an idle worker keeps a core busy, which on 2
cores takes a core from the other worker; here an idle pass sleeps 1 ms
(IDLE_POLL_S), which costs a request at most that much TTFT (an idle worker
then used 3% of a core).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import sys
import threading

import litserve as ls
from litserve.loops import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

import peer_args  # a sibling module: the harness runs this file as a script

IDLE_POLL_S = 0.001


class IdleSleepingLoop(ContinuousBatchingLoop):
    """LitServe's continuous batching loop, sleeping instead of spinning while no request is active."""

    async def run(self, lit_api, *args, **kwargs):
        if not lit_api.has_active_requests():
            await asyncio.sleep(IDLE_POLL_S)
            return
        await super().run(lit_api, *args, **kwargs)


class CausalLMAPI(ls.LitAPI):
    def __init__(self, model_dir: str, threads: int, concurrency: int) -> None:
        super().__init__(stream=True, max_batch_size=concurrency, loop=IdleSleepingLoop())
        self.model_dir = model_dir
        self.threads = threads

    def setup(self, device) -> None:
        from mpsd.worker.backends.torch_lm import TorchCausalLM
        from mpsd.worker.device import set_torch_threads

        set_torch_threads(self.threads)
        self.engine = TorchCausalLM(self.model_dir, "cpu")
        self.waiting: collections.deque = collections.deque()   # (uid, params), appended by the event loop's thread
        self.running: dict[int, tuple[str, object]] = {}       # sequence id -> (uid, SequenceStream)
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self._warm_up()

    def _warm_up(self) -> None:
        self.add_request("warm-up", {"prompt": "Hello", "max_tokens": 4})
        while self.has_active_requests():
            self.step(None)

    def decode_request(self, request):
        from mpsd.generate_params import GenerateParams

        return GenerateParams(prompt=str(request["prompt"]), max_tokens=int(request["max_tokens"]),
                              temperature=0.0, top_p=1.0, seed=0, stop=())

    def add_request(self, uid, request) -> None:
        with self.lock:
            self.waiting.append((uid, self.decode_request(request)))

    def has_capacity(self) -> bool:
        return True

    def has_active_requests(self) -> bool:
        with self.lock:
            return bool(self.waiting or self.running)

    def step(self, prev_outputs) -> list:
        """Runs on a thread of LitServe's loop; one at a time, so only it touches the engine."""
        from mpsd.worker.backends.base import TokenEvent

        self._admit()
        output = self.engine.step()
        outputs = []
        for seq_id, exc in output.failed.items():
            uid, _ = self._leave(seq_id)
            outputs.append(Output(uid, exc, LitAPIStatus.ERROR))
        for seq_id, token_id in output.tokens.items():
            uid, stream = self.running[seq_id]
            for event in stream.push(token_id):
                if isinstance(event, TokenEvent):
                    outputs.append(Output(uid, {"i": event.index, "text": event.text}, LitAPIStatus.OK))
            if stream.finished:
                self._leave(seq_id)
                outputs.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
        return outputs

    def _admit(self) -> None:
        from mpsd.worker.backends.streaming import SequenceStream

        engine = self.engine
        while len(self.running) < self.max_batch_size:
            with self.lock:
                if not self.waiting:
                    return
                uid, params = self.waiting.popleft()
            prompt_ids = engine.encode(params.prompt)
            budget = min(params.max_tokens, engine.context_length - len(prompt_ids))
            seq_id = next(self.ids)
            stream = SequenceStream(prompt_ids=prompt_ids, params=params, budget=budget, eos_ids=engine.eos_ids,
                                    decode=engine.decode)
            with self.lock:
                self.running[seq_id] = (uid, stream)
            engine.add(seq_id, prompt_ids, params, budget)

    def _leave(self, seq_id: int):
        self.engine.remove(seq_id)
        with self.lock:
            return self.running.pop(seq_id)

    def encode_response(self, output):
        return output   # a dict becomes one JSON line; the final "" ends the stream


def main(argv=None) -> int:
    args = peer_args.parser().parse_args(argv)
    server = ls.LitServer(CausalLMAPI(args.model_dir, args.threads, args.concurrency), accelerator="cpu", devices=1,
                          workers_per_device=args.replicas, timeout=False)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=1, generate_client_file=False, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
