"""A Hugging Face causal LM from a local directory, decoded token by token.

The loop is written out (rather than model.generate) because the worker must
stream each token as it is chosen, stop the moment the client goes away, and
count tokens itself.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Iterator

from mpsd.worker.backends import sampling
from mpsd.worker.backends.base import BootFailure, Finished, GenerateParams, MemoryReport, TokenEvent
from mpsd.worker.backends.memory import torch_memory_report
from mpsd.worker.backends.streaming import check_prompt, stream_events
from mpsd.worker_spec import WorkerSpec


class TorchCausalLM:
    def __init__(self, model_dir: str, device: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = pathlib.Path(model_dir)
        if not (path / "config.json").is_file():
            raise BootFailure(f"model directory {model_dir!r} has no config.json (is the path right?)")
        self._torch = torch
        self.device = device
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self._model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise BootFailure(f"cannot load the model in {model_dir!r}: {exc}") from exc
        self._model.to(device).eval()
        self.context_length = _context_length(self._model.config)
        self._eos_ids = _eos_ids(self._model.config, self._tokenizer)

    def warm_up(self) -> None:
        """One short greedy run, so the first client does not pay for lazy init."""
        params = GenerateParams(prompt="Hello", max_tokens=4, temperature=0.0, top_p=1.0, seed=0, stop=())
        for _ in self.generate(params, lambda: True):
            pass

    def memory_report(self) -> MemoryReport:
        return torch_memory_report(self._torch, self.device)

    def generate(self, params: GenerateParams, keep_going: Callable[[], bool]) -> Iterator[TokenEvent | Finished]:
        prompt_ids = self._tokenizer.encode(params.prompt, add_special_tokens=False)
        check_prompt(prompt_ids, params, self.context_length)
        generator = sampling.make_generator(params.seed, self.device)
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        with self._torch.inference_mode():
            yield from stream_events(
                self._decode_steps(prompt_ids, params, generator), prompt_ids=prompt_ids, params=params,
                budget=budget, eos_ids=self._eos_ids, decode=self._decode, keep_going=keep_going,
            )

    def _decode_steps(self, prompt_ids: list[int], params: GenerateParams, generator) -> Iterator[int]:
        """Yields one chosen token per step, feeding only the new token back (KV cache)."""
        torch = self._torch
        input_ids = torch.tensor([prompt_ids], device=self.device)
        past = None
        while True:
            output = self._model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = output.past_key_values
            token_id = sampling.next_token(output.logits[0, -1], params.temperature, params.top_p, generator)
            yield token_id
            input_ids = torch.tensor([[token_id]], device=self.device)

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def load(spec: WorkerSpec, log: Callable[[str], None]) -> TorchCausalLM:
    """spec.device is the device the worker picked, never 'auto'."""
    return TorchCausalLM(spec.path, spec.device)


def _context_length(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(config, tokenizer) -> frozenset[int]:
    ids = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
    if ids is None:
        return frozenset()
    return frozenset(ids if isinstance(ids, list) else [ids])
