"""An mlx-lm causal LM from a local directory, decoded token by token (issue 6).

Runs on Metal on Apple silicon and on the MLX CPU backend elsewhere (Linux:
`pip install "mlx[cpu]"`). mpsd's own torch code stays out of an mlx worker;
mlx-lm's tokenizer imports transformers, which imports torch when it is
installed in the same environment (it costs start time, not correctness).

Wiring. mlx-lm 0.32.2's `stream_generate` (and `generate`, and
`BatchGenerator`) wrap every generation in `mlx_lm.generate.wired_limit`,
which calls `mlx_lm.utils.maybe_set_recommended_wired_limit()`: on Metal it
sets the wired limit to the device's whole `max_recommended_working_set_size`
for the duration of the generation and restores the previous value after. With
several workers on one Mac each would try to wire the whole working set, so
this backend does not call `stream_generate`: it drives
`mlx_lm.generate.generate_step` (the token loop `stream_generate` wraps, which
never touches the wired limit) itself, and the wired limit stays what the
worker's spec set at load (`mx.set_wired_limit`), or MLX's default of 0 when
none was given. On the CPU backend the wired limit is a no-op either way.

Sampling. mlx-lm's `make_sampler` draws from MLX's global random state, so a
seed set with `mx.random.seed` reproduces a request only while no other
request samples at the same time. Here each request owns a PRNG key (from its
seed, or fresh randomness) and splits it per token, so a seeded request gives
the same tokens whatever runs beside it; greedy and top_p follow mlx-lm's own
`apply_top_p` and the same rules as the torch backend.
"""

from __future__ import annotations

import json
import pathlib
import secrets
from typing import Callable, Iterator

from mpsd.worker.backends.base import BootFailure, Finished, GenerateParams, MemoryReport, TokenEvent
from mpsd.backend_memory import MLX_ACTIVE, MLX_CACHE, MLX_MAX_RECOMMENDED_WORKING_SET, MLX_MEMORY_SIZE, MLX_PEAK
from mpsd.worker.backends.streaming import check_prompt, stream_events
from mpsd.worker_spec import WorkerSpec

FLOAT32_MAX = 3.4028234663852886e38
CPU_NOTE = ("mlx on the cpu backend: the device has no Metal working set, so "
            f"{MLX_MAX_RECOMMENDED_WORKING_SET} and {MLX_MEMORY_SIZE} are absent")


class MlxCausalLM:
    def __init__(
        self,
        model_dir: str,
        memory_limit_bytes: int | None = None,
        wired_limit_bytes: int | None = None,
        cache_limit_bytes: int | None = None,
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
        self._eos_ids = _eos_ids(config, self._tokenizer)

    def warm_up(self) -> None:
        """One short greedy run, so the first client does not pay for lazy init."""
        params = GenerateParams(prompt="Hello", max_tokens=4, temperature=0.0, top_p=1.0, seed=0, stop=())
        for _ in self.generate(params, lambda: True):
            pass

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

    def generate(self, params: GenerateParams, keep_going: Callable[[], bool]) -> Iterator[TokenEvent | Finished]:
        from mlx_lm.generate import generate_step

        mx = self._mx
        prompt_ids = list(self._tokenizer.encode(params.prompt, add_special_tokens=False))
        check_prompt(prompt_ids, params, self.context_length)
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        # generate_step, not stream_generate: see the module docstring on wiring.
        # MLX errors ("[metal::malloc] ...", "[malloc] Unable to allocate ...")
        # propagate unchanged; the worker server classifies them as out of memory.
        steps = generate_step(
            mx.array(prompt_ids), self._model,
            max_tokens=budget, sampler=_make_sampler(mx, params),
        )
        try:
            yield from stream_events(
                (token_id for token_id, _logprobs in steps), prompt_ids=prompt_ids, params=params, budget=budget,
                eos_ids=self._eos_ids, decode=self._decode, keep_going=keep_going,
            )
        finally:
            steps.close()  # leaves generate_step's stream context even when we stop early

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


def load(spec: WorkerSpec, log: Callable[[str], None]) -> MlxCausalLM:
    log(f"loading mlx-lm model from {spec.path}")
    model = MlxCausalLM(
        spec.path,
        memory_limit_bytes=spec.mlx_memory_limit,
        wired_limit_bytes=spec.mlx_wired_limit,
        cache_limit_bytes=spec.mlx_cache_limit,
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
