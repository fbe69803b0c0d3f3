"""The model without mpsd: streams decoded in this process, the limit the worker's own loop sets.

It drives the same engine and decode loop (DecodeScheduler) the worker runs,
so the only difference from mpsd is the process boundary and the transport.
"""

from __future__ import annotations

from typing import Iterator

from mpsd.generate_params import GenerateParams
from mpsd.worker.backends.base import TokenEvent


def load(model_dir: str, threads: int, max_sequences: int = 1):
    """A torch-lm engine on its own decode thread, warmed up."""
    from mpsd.worker.backends.torch_lm import TorchCausalLM
    from mpsd.worker.device import set_torch_threads
    from mpsd.worker.scheduler import DecodeScheduler

    set_torch_threads(threads)
    scheduler = DecodeScheduler(TorchCausalLM(model_dir, "cpu"), max_sequences)
    scheduler.start()
    list(start(scheduler, "Hello", 4))
    return scheduler


def load_null(max_sequences: int):
    """The zero-compute null-lm engine on its own decode thread: the scheduler's ceiling with no transport."""
    from mpsd.worker.backends.null_lm import NullLM
    from mpsd.worker.scheduler import DecodeScheduler

    scheduler = DecodeScheduler(NullLM(), max_sequences)
    scheduler.start()
    return scheduler


def start(scheduler, prompt: str, max_tokens: int) -> Iterator[TokenEvent]:
    """Submits the request now; the iterator yields its tokens."""
    params = GenerateParams(prompt=prompt, max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=0, stop=())
    return (e for e in scheduler.submit(params) if isinstance(e, TokenEvent))
