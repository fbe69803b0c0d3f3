"""A Hugging Face causal LM from a local directory, decoded token by token.

The loop is written out (rather than model.generate) because the worker must
stream each token as it is chosen, stop the moment the client goes away, and
count tokens itself.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Iterator

from mpsd.generate_params import check_against_model
from mpsd.worker.backends import sampling
from mpsd.worker.backends.base import (
    BootFailure, Finished, GenerateParams, InvalidRequest, MemoryReport, TokenEvent,
)
from mpsd.worker.backends.memory import torch_memory_report
from mpsd.worker.backends.text import IncrementalDetokenizer, StopMatcher


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
        prompt_ids = self._encode_prompt(params)
        generator = sampling.make_generator(params.seed, self.device)
        detokenizer = IncrementalDetokenizer(self._decode, prompt_ids)
        stops = StopMatcher(params.stop)
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        with self._torch.inference_mode():
            steps = self._decode_steps(prompt_ids, params, generator)
            for index in range(budget):
                if not keep_going():
                    return
                token_id = next(steps)
                if token_id in self._eos_ids:
                    yield from _held_back(index, token_id, stops.flush())
                    yield Finished("stop", len(prompt_ids), index + 1)
                    return
                text, stopped = stops.feed(detokenizer.push(token_id))
                if stopped:
                    yield from _held_back(index, token_id, text)
                    yield Finished("stop", len(prompt_ids), index + 1)
                    return
                if index == budget - 1:
                    text += stops.flush()
                yield TokenEvent(index, token_id, text)
        yield Finished("length", len(prompt_ids), budget)

    def _encode_prompt(self, params: GenerateParams) -> list[int]:
        prompt_ids = self._tokenizer.encode(params.prompt, add_special_tokens=False)
        if not prompt_ids:
            raise InvalidRequest("prompt: encodes to no tokens")
        if len(prompt_ids) >= self.context_length:
            raise InvalidRequest(
                f"prompt: {len(prompt_ids)} tokens does not fit the model's context of {self.context_length} tokens"
                " (leave room for at least one generated token)"
            )
        check_against_model(params, self.context_length)
        return prompt_ids

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


def _held_back(index: int, token_id: int, text: str) -> Iterator[TokenEvent]:
    """The last piece of text before a stop, if the stop left any."""
    if text:
        yield TokenEvent(index, token_id, text)


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
