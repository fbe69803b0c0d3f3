"""The model without mpsd: one stream in-process (the physical limit), and N threads with their own copies.

Both drive the same TorchCausalLM decode loop the worker runs, so the only
difference from mpsd is the process boundary and the transport.
"""

from __future__ import annotations

import concurrent.futures
import time

from benchmarks.timing import StreamTiming, time_tokens
from mpsd.generate_params import GenerateParams
from mpsd.worker.backends.base import TokenEvent


def load(model_dir: str, threads: int):
    from mpsd.worker.backends.torch_lm import TorchCausalLM
    from mpsd.worker.device import set_torch_threads

    set_torch_threads(threads)
    model = TorchCausalLM(model_dir, "cpu")
    model.warm_up()
    return model


def decode(model, prompt: str, max_tokens: int) -> StreamTiming:
    params = GenerateParams(prompt=prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=())
    return time_tokens(e for e in model.generate(params, lambda: True) if isinstance(e, TokenEvent))


def threads_tps(model_dir: str, count: int, threads_each: int, prompt: str, max_tokens: int, repeats: int) -> float:
    """count threads in this process, each with its own model copy, decoding at once."""
    models = [load(model_dir, threads_each) for _ in range(count)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        totals = list(pool.map(lambda m: sum(decode(m, prompt, max_tokens).tokens for _ in range(repeats)), models))
    return sum(totals) / (time.perf_counter() - started)
