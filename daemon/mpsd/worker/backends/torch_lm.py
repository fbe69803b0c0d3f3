"""A Hugging Face causal LM from a local directory, decoding many sequences per step.

Our own loop, not transformers' continuous batching (`init_continuous_batching`):
that one samples the whole batch with one multinomial from the process's
global RNG and seeds it process-wide, so a seeded request cannot give the same
tokens beside others as alone; it has no stop strings and runs its own thread.
Measured on this CPU (demo model, one thread) our loop was also faster at every
batch size (10.9k vs 7.2k tok/s at 16). Here each request samples its row with
its own torch.Generator (sampling.py), prompts prefill alone in chunks, and the
decoding rows share one left-padded KV cache (torch_batch.KVBatch).

Prefix cache. transformers keeps no store of earlier prompts, so a finished
sequence's row of the batch (prompt and answer) is copied out into a
prefix_store.PrefixStore; a new prompt starts from a copy of the entry with the
longest common prefix, cut to it, and prefills the rest from that position.
Only caches made of plain full-attention layers are kept: a sliding-window
layer cannot be cut back to an arbitrary length.

Batched rows are not bit-identical to a sequence alone on CPU (matmul results
depend on the batch size; padded attention adds ~1e-6), so a seeded or greedy
request can differ from its solo run only where two tokens tie within ~1e-5:
0 of 5,987 tokens differed (`python -m benchmarks equality`, docs/performance.md).
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from typing import Callable

from mpsd.worker.backends import chat, sampling
from mpsd.worker.backends.base import BootFailure, GenerateParams, MemoryReport, StepOutput
from mpsd.worker.backends.memory import torch_memory_report
from mpsd.worker.agents.mask_thread import MaskThread
from mpsd.worker.agents.matcher import consume_all
from mpsd.worker.backends.torch_batch import KVBatch, cache_nbytes, copy_cache
from mpsd.worker.prefix_store import PrefixStore
from mpsd.worker_spec import WorkerSpec

PREFILL_CHUNK_TOKENS = 256  # prompt tokens one step may prefill: what a long prompt can delay the others by


@dataclasses.dataclass(eq=False)
class _Sequence:
    params: GenerateParams
    prompt_ids: list[int]
    generator: object  # torch.Generator: this request's own randomness
    cache: object      # its own DynamicCache while prefilling, then in the KVBatch
    prefilled: int = 0
    next_input: int = -1  # the token it feeds at its next decode step
    sampled: list[int] = dataclasses.field(default_factory=list)  # its answer so far, the KV of all but the last held
    grammar: object = None  # agents.matcher.RowGrammar: the tokens it may sample, or None


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
        self.eos_ids = _eos_ids(self._model.config, self._tokenizer)
        self.chat_template = chat.template_of(self._tokenizer)
        self.logits_width = int(self._model.get_output_embeddings().weight.shape[0])  # a grammar mask's width
        self._sequences: dict[int, _Sequence] = {}
        self._prefilling: collections.deque[int] = collections.deque()
        self._batch = KVBatch()
        self._masks = MaskThread()
        self.kv_bytes_per_token, layer_kinds = self._measure_kv_per_token()
        self.weights_bytes = sum(t.nbytes for t in (*self._model.parameters(), *self._model.buffers()))
        # Budget 0 until the worker sets it (scheduler.configure_prefix_cache).
        self.prefix_cache = PrefixStore(0, cache_nbytes) if layer_kinds == {"DynamicLayer"} else None

    def _measure_kv_per_token(self) -> tuple[int, set[str]]:
        """One token through the model: its cache is exactly one token's KV (DynamicCache does not preallocate).
        Also the kinds of cache layer the model makes, which say whether a prefix can be cut and reused."""
        from transformers import DynamicCache

        cache = DynamicCache()
        with self._torch.inference_mode():
            self._model(input_ids=self._torch.tensor([[0]], device=self.device), past_key_values=cache, use_cache=True)
        return cache_nbytes(cache), {type(layer).__name__ for layer in cache.layers}

    def memory_report(self) -> MemoryReport:
        return torch_memory_report(self._torch, self.device)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids, keep_special: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=not keep_special, clean_up_tokenization_spaces=False)

    def grammar_tokenizer(self):
        return self._tokenizer

    def add(self, seq_id: int, prompt_ids: list[int], params: GenerateParams, budget: int, grammar=None) -> int:
        """Starts from a copy of the longest cached prefix, if any; the copy is this sequence's own to extend."""
        from transformers import DynamicCache

        generator = sampling.make_generator(params.seed, self.device)
        match = self.prefix_cache.lookup(prompt_ids) if self.prefix_cache is not None else None
        cache = copy_cache(match.payload, match.reuse) if match else DynamicCache()
        self._sequences[seq_id] = _Sequence(params, prompt_ids, generator, cache, prefilled=match.reuse if match else 0,
                                            grammar=grammar)
        self._prefilling.append(seq_id)
        return match.reuse if match else 0

    def remove(self, seq_id: int, keep: bool = False) -> None:
        sequence = self._sequences.pop(seq_id, None)
        if sequence is None:
            return
        if seq_id in self._batch.ids:
            if keep and self.prefix_cache is not None and self.prefix_cache.budget_bytes:
                row = self._batch.row_cache(seq_id)
                self.prefix_cache.insert((sequence.prompt_ids + sequence.sampled)[:row.get_seq_length()], row)
            self._batch.leave(seq_id)
        else:
            self._prefilling.remove(seq_id)

    def kv_bytes(self) -> int:
        prefilling = sum(cache_nbytes(self._sequences[i].cache) for i in self._prefilling)
        return self._batch.nbytes() + prefilling

    def step(self) -> StepOutput:
        output = StepOutput()
        with self._torch.inference_mode():
            decoding = list(self._batch.ids)
            if decoding:
                self._decode(output)
            self._prefill(output)
        return output

    def _decode(self, output: StepOutput) -> None:
        """One token for every row of the batch, each sampled with its own request's rules."""
        torch, batch = self._torch, self._batch
        inputs = torch.tensor([[self._sequences[i].next_input] for i in batch.ids], device=self.device)
        undo = batch.checkpoint()
        mask, positions = batch.advance()
        allowed = self._masks.start([(row, self._sequences[i].grammar) for row, i in enumerate(batch.ids)
                                     if self._sequences[i].grammar is not None], self.logits_width)
        try:
            result = self._model(input_ids=inputs, attention_mask=mask.to(self.device),
                                 position_ids=positions.to(self.device), past_key_values=batch.cache, use_cache=True)
        except Exception:
            batch.rollback(undo)  # the scheduler frees a sequence and tries the step again
            allowed.result()
            raise
        logits, masks = result.logits[:, -1], allowed.result()
        if masks is not None:  # every constrained row masked in one operation
            rows, allowed_rows = masks
            logits[rows] = logits[rows].masked_fill(~torch.from_numpy(allowed_rows).to(logits.device), float("-inf"))
        for seq_id, row in zip(batch.ids, logits):
            output.tokens[seq_id] = self._sample(seq_id, row, masked=True)
        if masks is not None:  # and every constrained row takes its token in one call
            consume_all([(self._sequences[batch.ids[row]].grammar, self._sequences[batch.ids[row]].next_input)
                         for row in masks[0]])
        output.decode_rows = len(batch.ids)

    def _prefill(self, output: StepOutput) -> None:
        """Up to one chunk of prompt tokens, first come first served; a finished prompt joins the batch.

        Whole short prompts at the head of the queue prefill together in one forward: prompts that arrive in a
        burst (16 clients at once) would otherwise cost one forward each while every running stream waits.
        """
        room = self._prefill_together(output, PREFILL_CHUNK_TOKENS)
        while self._prefilling and room:
            seq_id = self._prefilling[0]
            sequence = self._sequences[seq_id]
            start = sequence.prefilled
            chunk = sequence.prompt_ids[start:start + room]
            try:
                logits = self._forward_prompt(sequence, chunk, start)
            except Exception as exc:  # noqa: BLE001  (its own prefill: only this sequence fails)
                output.failed[seq_id] = exc
                return
            sequence.prefilled += len(chunk)
            room -= len(chunk)
            output.prefill_tokens += len(chunk)
            if sequence.prefilled == len(sequence.prompt_ids):
                self._prefilling.popleft()
                output.tokens[seq_id] = self._sample(seq_id, logits)
                self._batch.join(seq_id, sequence.cache)

    def _prefill_together(self, output: StepOutput, room: int) -> int:
        """Right-padded, so each prompt's tokens see only its own (causal attention; padding comes after them);
        each row's cache is then cut to its own length. A failure falls back to one prompt at a time, so an
        out-of-memory error is still pinned on one request."""
        group = []
        for seq_id in self._prefilling:
            sequence = self._sequences[seq_id]
            if sequence.prefilled or len(sequence.prompt_ids) > room - sum(len(s.prompt_ids) for _, s in group):
                break
            group.append((seq_id, sequence))
        if len(group) < 2:
            return room
        try:
            logits = self._forward_prompts([sequence for _, sequence in group])
        except Exception:  # noqa: BLE001  (the loop below retries each alone)
            return room
        for (seq_id, sequence), row in zip(group, logits):
            self._prefilling.popleft()
            sequence.prefilled = len(sequence.prompt_ids)
            output.prefill_tokens += sequence.prefilled
            output.tokens[seq_id] = self._sample(seq_id, row)
            self._batch.join(seq_id, sequence.cache)
        return room - sum(len(sequence.prompt_ids) for _, sequence in group)

    def _forward_prompts(self, sequences: list[_Sequence]) -> list:
        from transformers import DynamicCache

        torch = self._torch
        lengths = [len(s.prompt_ids) for s in sequences]
        width = max(lengths)
        inputs = torch.tensor([s.prompt_ids + [0] * (width - len(s.prompt_ids)) for s in sequences], device=self.device)
        positions = torch.arange(width, device=self.device)[None].expand(len(sequences), -1)
        together = DynamicCache()
        result = self._model(input_ids=inputs, position_ids=positions, past_key_values=together, use_cache=True)
        for row, (sequence, length) in enumerate(zip(sequences, lengths)):
            for index, layer in enumerate(together.layers):
                sequence.cache.update(layer.keys[row:row + 1, :, :length], layer.values[row:row + 1, :, :length], index)
        return [result.logits[row, length - 1] for row, length in enumerate(lengths)]

    def _forward_prompt(self, sequence: _Sequence, chunk: list[int], start: int):
        torch = self._torch
        inputs = torch.tensor([chunk], device=self.device)
        positions = torch.arange(start, start + len(chunk), device=self.device)[None]
        result = self._model(input_ids=inputs, position_ids=positions, past_key_values=sequence.cache, use_cache=True)
        return result.logits[0, -1]

    def _sample(self, seq_id: int, logits, masked: bool = False) -> int:
        """masked: the row's grammar mask is applied already and the decode step feeds the grammar the token (both
        batched); a prefill's first token is masked and consumed here."""
        sequence = self._sequences[seq_id]
        params, grammar = sequence.params, sequence.grammar
        if grammar is not None and not masked:
            allowed = grammar.allowed(logits.shape[-1])
            logits = logits.masked_fill(~self._torch.from_numpy(allowed).to(logits.device), float("-inf"))
        sequence.next_input = sampling.next_token(logits, params.temperature, params.top_p, sequence.generator)
        sequence.sampled.append(sequence.next_input)
        if grammar is not None and not masked:
            grammar.consume(sequence.next_input)
        return sequence.next_input


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
