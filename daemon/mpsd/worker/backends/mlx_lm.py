"""An mlx-lm causal LM from a local directory, decoding many sequences per step.

Runs on Metal on Apple silicon and on the MLX CPU backend elsewhere (Linux:
`pip install "mlx[cpu]"`). mpsd's own torch code stays out of an mlx worker;
mlx-lm's tokenizer imports transformers, which imports torch when it is
installed in the same environment (it costs start time, not correctness).

Batching. mlx-lm 0.32's `BatchGenerator` does what the scheduler needs:
insert() a prompt at any time, next() for one decode step of every running
sequence plus one prefill chunk of waiting prompts (left-padded per-row
offsets, chunked prefill interleaved with decode), remove() at any stage,
which drops the sequence's rows of the batched KV cache. It takes one sampler
per request, which is how seeds hold (below). Measured on the CPU backend,
batched rows were bit-identical to solo decoding, greedy and seeded, with
sequences joining and leaving mid-way. mpsd keeps its own end-of-text, stop
and budget rules (SequenceStream), so the generator is given no stop tokens
and one token more than the budget, and never ends a sequence by itself.

Wiring. `BatchGenerator()` (like `stream_generate`) calls
`mlx_lm.utils.maybe_set_recommended_wired_limit()`: on Metal it sets the
wired limit to the device's whole `max_recommended_working_set_size` until
`close()`. With several workers on one Mac each would try to wire the whole
working set, so the generator is closed right after it is built (it stays
usable: close() only restores the limit), and the wired limit stays what the
worker's spec set at load (`mx.set_wired_limit`), or MLX's default of 0. On
the CPU backend the wired limit is a no-op either way.

Sampling. mlx-lm's `make_sampler` draws from MLX's global random state, so a
seed set with `mx.random.seed` reproduces a request only while no other
request samples at the same time (mlx_lm.server therefore never batches a
seeded request). Here each request owns a PRNG key (from its seed, or fresh
randomness) and splits it per token, so a seeded request gives the same
tokens whatever runs beside it; greedy and top_p follow mlx-lm's own
`apply_top_p` and the same rules as the torch backend. BatchGenerator calls a
request's sampler on its own row whenever the rows' samplers differ.

Prefix cache. mlx-lm has a store of its own, `LRUPromptCache` (mlx_lm.server's):
a token trie of caches, counted in bytes, that finds the longest cached
prefix of a prompt, cuts a longer entry to the common part (on a deep copy:
entries stay as they were), drops the entries a longer run extends, and knows
which cache kinds can be cut (a sliding-window or recurrent layer cannot: such
a model reuses only an entry that is a whole prefix). prefix_store.PrefixStore
would need all that redone for MLX's cache classes, so MlxPrefixCache only puts
mpsd's rules around it: a byte budget applied after each insert (the entries
it drops are evictions; a prefix replaced by its extension is not), no entry
larger than the budget, and at least the prompt's last token prefilled (an
exact hit leaves nothing to prefill, which BatchGenerator refuses: one token is
cut off). A hit is inserted with its cache, only the rest of the prompt to
prefill, and the cached part as `all_tokens`. A finished sequence leaves with
`remove(return_prompt_caches=True)`: its row of the batched cache and the
tokens that row holds, the prompt and every token it returned (the one sampled
a step ahead is not in it), which the next turn's prompt starts with. Its
order is mlx-lm's: the least recently stored entry goes first; a hit refreshes
its entry when the turn that used it is stored, which replaces it.
"""

from __future__ import annotations

import json
import pathlib
import secrets
import sys
from typing import Callable

from mpsd.backend_memory import MLX_ACTIVE, MLX_CACHE, MLX_MAX_RECOMMENDED_WORKING_SET, MLX_MEMORY_SIZE, MLX_PEAK
from mpsd.oom import exception_oom
from mpsd.worker.backends import chat
from mpsd.worker.backends.base import BootFailure, GenerateParams, MemoryReport, StepOutput
from mpsd.worker_spec import WorkerSpec

FLOAT32_MAX = 3.4028234663852886e38
PREFILL_CHUNK_TOKENS = 256  # prompt tokens per prefilling sequence per step
PREFILL_SEQUENCES = 4       # prompts prefilled together in one step
CPU_NOTE = ("mlx on the cpu backend: the device has no Metal working set, so "
            f"{MLX_MAX_RECOMMENDED_WORKING_SET} and {MLX_MEMORY_SIZE} are absent")


class MlxCausalLM:
    def __init__(
        self,
        model_dir: str,
        memory_limit_bytes: int | None = None,
        wired_limit_bytes: int | None = None,
        cache_limit_bytes: int | None = None,
        max_sequences: int = 1,
    ) -> None:
        import mlx.core as mx

        path = pathlib.Path(model_dir)
        if not (path / "config.json").is_file():
            raise BootFailure(f"model directory {model_dir!r} has no config.json (is the path right?)")
        self._mx = mx
        self._metal = "max_recommended_working_set_size" in _device_info(mx)
        self.device = "mlx-metal" if self._metal else "mlx-cpu"
        self.limits_before = _apply_limits(mx, memory_limit_bytes, wired_limit_bytes, cache_limit_bytes)
        try:
            import mlx_lm

            self._model, self._tokenizer = mlx_lm.load(str(path))
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BootFailure(f"cannot load the model in {model_dir!r}: {exc}") from exc
        self.context_length = _context_length(config)
        self.eos_ids = _eos_ids(config, self._tokenizer)
        self.chat_template = chat.template_of(self._tokenizer)
        self._max_sequences = max_sequences
        self._generator = None  # built on the scheduler thread: MLX streams belong to a thread
        self._uids: dict[int, int] = {}  # sequence id -> the generator's uid
        self._sequences: dict[int, int] = {}  # the generator's uid -> sequence id
        self.kv_bytes_per_token, self.logits_width = _kv_bytes_per_token(mx, self._model)
        from mlx.utils import tree_flatten

        self.weights_bytes = sum(int(array.nbytes) for _, array in tree_flatten(self._model.parameters()))
        # Budget 0 until the worker sets it (scheduler.configure_prefix_cache).
        self.prefix_cache = MlxPrefixCache(mx, str(path))

    def memory_report(self) -> MemoryReport:
        mx = self._mx
        figures = {
            MLX_ACTIVE: int(mx.get_active_memory()),
            MLX_PEAK: int(mx.get_peak_memory()),
            MLX_CACHE: int(mx.get_cache_memory()),
        }
        info = _device_info(mx)
        if "max_recommended_working_set_size" in info:
            figures[MLX_MAX_RECOMMENDED_WORKING_SET] = int(info["max_recommended_working_set_size"])
            if "memory_size" in info:
                figures[MLX_MEMORY_SIZE] = int(info["memory_size"])
            return MemoryReport(figures)
        return MemoryReport(figures, note=CPU_NOTE)

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids, keep_special: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=not keep_special,
                                      clean_up_tokenization_spaces=False)

    def grammar_tokenizer(self):
        return getattr(self._tokenizer, "_tokenizer", self._tokenizer)  # the Hugging Face tokenizer it wraps

    def add(self, seq_id: int, prompt_ids: list[int], params: GenerateParams, budget: int, grammar=None) -> int:
        """Starts from a copy of the longest cached prefix, if any: only the rest of the prompt is prefilled."""
        cache, rest = self.prefix_cache.fetch(prompt_ids) if self.prefix_cache.budget_bytes else (None, prompt_ids)
        reused = len(prompt_ids) - len(rest)
        sampler, processors = _make_sampler(self._mx, params), []
        if grammar is not None:
            processor, sampler = _constrained(self._mx, grammar, sampler)
            processors.append(processor)
        (uid,) = self._batch().insert([rest], max_tokens=[budget + 1], caches=[cache], all_tokens=[prompt_ids[:reused]],
                                      samplers=[sampler], logits_processors=[processors])
        self._uids[seq_id], self._sequences[uid] = uid, seq_id
        return reused

    def remove(self, seq_id: int, keep: bool = False) -> None:
        """keep: it finished, so its KV (prompt and answer) goes to the prefix cache."""
        uid = self._uids.pop(seq_id, None)
        if uid is None:
            return
        del self._sequences[uid]
        keep = keep and self.prefix_cache.budget_bytes > 0
        caches = self._batch().remove([uid], return_prompt_caches=keep)
        if uid in caches:
            cache, held = caches[uid]  # held: the tokens its KV holds, prompt and every token it returned
            self.prefix_cache.insert(list(held), cache)

    def kv_bytes(self) -> int:
        return int(self._batch().prompt_cache_nbytes)

    def step(self) -> StepOutput:
        """MLX errors ("[metal::malloc] ...", "[malloc] Unable to allocate ...") propagate unchanged:
        the scheduler classifies them as out of memory."""
        generator = self._batch()
        with generator.stats() as stats:
            _, responses = generator.next()
        output = StepOutput(prefill_tokens=stats.prompt_tokens, decode_rows=len(responses))
        for response in responses:
            if response.uid in self._sequences:  # a removed one may still answer once: the batch runs a step ahead
                output.tokens[self._sequences[response.uid]] = int(response.token)
        return output

    def _batch(self):
        if self._generator is None:
            from mlx_lm.generate import BatchGenerator

            mx = self._mx
            self._generator = BatchGenerator(
                self._model, stop_tokens=None, completion_batch_size=self._max_sequences,
                prefill_batch_size=min(PREFILL_SEQUENCES, self._max_sequences),
                prefill_step_size=PREFILL_CHUNK_TOKENS, stream=mx.default_stream(mx.default_device()))
            self._generator.close()  # give back the wired limit it took: see the module docstring
        return self._generator


class MlxPrefixCache:
    """mlx-lm's LRUPromptCache behind the PrefixCache protocol (see the module docstring); scheduler thread only."""

    def __init__(self, mx, key: str, budget_bytes: int = 0) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        self._mx = mx
        self._key = key  # the store is keyed by model; a worker has one
        # No bounds of its own: the budget is applied after each insert, so evictions can be told from prefixes.
        self._store = LRUPromptCache(max_size=sys.maxsize, max_bytes=sys.maxsize)
        self.budget_bytes = max(0, budget_bytes)
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return int(self._store.nbytes)

    def __len__(self) -> int:
        return len(self._store)

    def fetch(self, prompt_ids: list[int]) -> tuple[list | None, list[int]]:
        """A copy of the cache serving the longest part of the prompt, and the rest to prefill (never empty)."""
        from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

        cache, rest = self._store.fetch_nearest_cache(self._key, prompt_ids)
        if cache is not None and not rest:  # an exact hit: the last token is prefilled again, for its logits
            if not can_trim_prompt_cache(cache):
                return None, prompt_ids
            trim_prompt_cache(cache, 1)
            rest = prompt_ids[-1:]
        return cache, list(rest)

    def insert(self, tokens: list[int], cache: list) -> None:
        """Out of memory making the entry its own (it is a lazy slice of the batch) drops the whole store instead."""
        from mlx_lm.models.cache import KVCache

        size = sum(int(layer.nbytes) for layer in cache)
        # A full-attention layer holds exactly these tokens (tested); anything else would be a wrong entry.
        fits = all(layer.offset == len(tokens) for layer in cache if isinstance(layer, KVCache))
        if not tokens or size > self.budget_bytes or not fits:
            return
        try:
            self._mx.eval([layer.state for layer in cache])  # and the batch's arrays are no longer held through it
        except Exception as exc:  # only a saving: out of memory here is not this request's failure
            if not exception_oom(exc):
                raise
            self.clear()
            return
        self._store.insert_cache(self._key, tokens, cache)
        self._fit()

    def set_budget(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self._fit()

    def clear(self) -> int:
        """Drops every entry (an out-of-memory error needs the memory back); returns how many were dropped."""
        dropped = len(self._store)
        self._store.trim_to(n_sequences=0)
        self.evictions += dropped
        self._mx.clear_cache()  # MLX keeps freed buffers for reuse: give them back
        return dropped

    def _fit(self) -> None:
        before = len(self._store)
        self._store.trim_to(n_bytes=self.budget_bytes)
        self.evictions += before - len(self._store)


def load(spec: WorkerSpec, log: Callable[[str], None]) -> MlxCausalLM:
    log(f"loading mlx-lm model from {spec.path}")
    model = MlxCausalLM(
        spec.path,
        memory_limit_bytes=spec.mlx_memory_limit,
        wired_limit_bytes=spec.mlx_wired_limit,
        cache_limit_bytes=spec.mlx_cache_limit,
        max_sequences=spec.concurrency,
    )
    log(f"mlx-lm model on {model.device}, limits set (previous values: {model.limits_before})")
    return model


def _make_sampler(mx, params: GenerateParams) -> Callable:
    """A per-request sampler over log-probabilities of shape (1, vocab); returns shape (1,)."""
    if params.temperature <= 0.0:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    from mlx_lm.sample_utils import apply_top_p

    seed = params.seed if params.seed is not None else secrets.randbits(63)
    state = {"key": mx.random.key(seed % (1 << 64))}
    # Capped at float32's largest value: 1 / 1e-45 is inf there, and 0 * inf is NaN.
    inverse_temperature = min(1.0 / params.temperature, FLOAT32_MAX)
    top_p = params.top_p

    def sampler(logprobs):
        if top_p < 1.0:
            logprobs = apply_top_p(logprobs, top_p)
        state["key"], sub = mx.random.split(state["key"])
        # The best token scores 0 at any temperature, so a tiny one is greedy, not all -inf.
        best_is_zero = logprobs - mx.max(logprobs, axis=-1, keepdims=True)
        return mx.random.categorical(best_is_zero * inverse_temperature, key=sub)

    return sampler


def _constrained(mx, grammar, sampler: Callable) -> tuple[Callable, Callable]:
    """A logits processor that keeps one row inside its grammar (agents/matcher.py), and its sampler, which keeps
    the token it sampled for the grammar to take.

    BatchGenerator runs a step ahead: the processor for a row's next token is
    called before the token sampled at the step before has reached the
    scheduler, so the grammar takes that token here, from the sampler's own
    output. That output was computed with the whole step (async_eval), so only
    a step's first row waits for it and reading it costs the others nothing;
    a row is delivered to the scheduler only after this call, so the grammar
    has always consumed what the scheduler sees (streaming.py reads whether it
    stopped). The mask's bits are unpacked inside the graph. It is computed here,
    not beside the forward pass: the token it needs is the one the step before
    is still computing.
    """
    sampled = []

    def processor(tokens, logits):
        if sampled:
            grammar.consume(int(sampled.pop().item()))
        if grammar.stopped:
            return logits
        words = mx.array(grammar.bitmask())
        bits = mx.right_shift(words[:, None], mx.arange(32, dtype=words.dtype)) & 1
        allowed = bits.reshape(-1)[:logits.shape[-1]].astype(mx.bool_)
        if allowed.shape[0] < logits.shape[-1]:  # logits wider than the tokenizer's vocabulary: never those
            allowed = mx.concatenate([allowed, mx.zeros(logits.shape[-1] - allowed.shape[0], dtype=mx.bool_)])
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))

    def keeping(logprobs):
        token = sampler(logprobs)
        sampled.append(token)
        return token

    return processor, keeping


def _kv_bytes_per_token(mx, model) -> tuple[int, int]:
    """One token through the model; MLX caches grow in blocks, so bytes are divided by the slots allocated.
    Also the width of its logits, which a grammar's mask must cover."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([[0]]), cache=cache)
    mx.eval(logits)
    total = 0
    for layer in cache:
        for array in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if array is not None and array.ndim == 4 and array.shape[2]:
                total += array.nbytes // array.shape[2]
    return total, int(logits.shape[-1])


def _apply_limits(mx, memory: int | None, wired: int | None, cache: int | None) -> dict[str, int]:
    """Sets the process-wide MLX limits the spec names; returns the previous values by name."""
    before: dict[str, int] = {}
    for name, setter, value in (
        ("memory_limit", mx.set_memory_limit, memory),
        ("cache_limit", mx.set_cache_limit, cache),
        ("wired_limit", mx.set_wired_limit, wired),
    ):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise BootFailure(f"mlx {name}: must be a whole number of bytes (0 or more), got {value!r}")
        try:
            before[name] = int(setter(value))
        except (RuntimeError, ValueError) as exc:
            # Metal refuses a wired limit above the recommended working set size.
            raise BootFailure(f"mlx {name} of {value} bytes was refused: {exc}") from exc
    return before


def _device_info(mx) -> dict:
    try:
        return dict(mx.device_info())
    except (AttributeError, RuntimeError):
        return {}


def _context_length(config: dict) -> int:
    sources = [config, config.get("text_config") or {}]
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        for source in sources:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return 2048


def _eos_ids(config: dict, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    configured = config.get("eos_token_id")
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(i for i in configured if isinstance(i, int))
    ids.update(int(i) for i in (getattr(tokenizer, "eos_token_ids", None) or ()))
    return frozenset(ids)
