"""`python -m benchmarks equality`: how often a batched request's tokens differ from the same request alone.

Not a speed figure: the correctness cost of batching. Each engine decodes every
prompt alone, then all of them at once through the worker's decode loop (joining
a running batch one by one), greedy and seeded; it counts the tokens that differ.
On the MLX CPU backend batched rows are bit-identical to solo rows; on torch CPU
matmul results depend on the batch size (~1e-6), so a token can flip only at a
near-tie between its two most likely candidates.
"""

from __future__ import annotations

import threading
import time

from mpsd.generate_params import GenerateParams
from mpsd.worker.backends.base import TokenEvent
from mpsd.worker.scheduler import DecodeScheduler

WORDS = ("the value of the module", "return a list of", "raise an error when", "class that holds the", "if the file",
         "a function to read", "the number of items in", "open the socket and")


def prompts(count: int) -> list[str]:
    """Different lengths and words, so rows of a batch differ (3 to 30 words)."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 8)) for i in range(count)]


def compare(engine, count: int, max_tokens: int, stagger_s: float = 0.002) -> dict:
    scheduler = DecodeScheduler(engine, count)
    scheduler.start()
    results = {}
    for mode, temperature in (("greedy", 0.0), ("seeded", 0.8)):
        requests = [GenerateParams(p, max_tokens, temperature, 0.95, seed, ()) for seed, p in enumerate(prompts(count))]
        alone = [_tokens(scheduler.submit(r)) for r in requests]
        batched: list[list[int]] = [[] for _ in requests]
        threads = []
        for i, request in enumerate(requests):
            submission = scheduler.submit(request)
            threads.append(threading.Thread(target=lambda i=i, s=submission: batched[i].extend(_tokens(s))))
            threads[-1].start()
            time.sleep(stagger_s)
        for thread in threads:
            thread.join()
        differing = sum(a != b for x, y in zip(alone, batched) for a, b in zip(x, y))
        results[mode] = {"tokens": sum(map(len, alone)), "differing_tokens": differing,
                         "requests_differing": sum(x != y for x, y in zip(alone, batched)),
                         "widest_batch": max(step.decode_rows for step in scheduler.steps)}
    scheduler.stop()
    return results


def _tokens(submission) -> list[int]:
    return [e.token_id for e in submission if isinstance(e, TokenEvent)]


def engines(model) -> dict:
    """The torch engine on one thread, and the MLX engine where mlx-lm is installed."""
    from mpsd.worker.backends.torch_lm import TorchCausalLM
    from mpsd.worker.device import set_torch_threads

    set_torch_threads(1)
    found = {"torch-lm": lambda: TorchCausalLM(model.torch_dir, "cpu")}
    if model.mlx_dir:
        from mpsd.worker.backends.mlx_lm import MlxCausalLM

        found["mlx-lm"] = lambda: MlxCausalLM(model.mlx_dir, max_sequences=32)
    return found
