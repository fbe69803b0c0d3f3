"""Builds a tiny MLX demo model: a llama-style mlx-lm directory with seeded random weights.

It exists to exercise the mlx-lm backend (tests, a Linux box with the MLX CPU
backend, a Mac without network access), not to produce sensible text: the
weights are random, drawn from a fixed seed, so the same MLX version always
builds the same model. The tokenizer is the torch demo model's (a byte-level
BPE, so any UTF-8 text encodes and decodes exactly), copied from its default
directory unless another is named.

The result is an ordinary mlx-lm directory that `mlx_lm.load` reads unchanged;
its marker (see models.py) says it is complete. Run it as
`python -m mpsd.demo.mlx_model OUT_DIR [--tokenizer-dir DIR]`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import time
from typing import Any

from mpsd.demo import cli
from mpsd.demo.models import MLX_DEMO, TORCH_DEMO, DemoModel, DemoModelError, Progress
from mpsd.demo.staging import build_once

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The model's shape, as config.json states it; also recorded in the marker.
LLAMA_SHAPE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    # Small on purpose: a test can overflow it with a short prompt.
    "max_position_embeddings": 256,
}
SEED = 0


def build_mlx_demo_model(
    out_dir: pathlib.Path | str,
    *,
    progress: Progress = print,
    tokenizer_dir: pathlib.Path | str | None = None,
) -> pathlib.Path:
    """Builds the model into out_dir unless a complete one is there; returns out_dir."""
    source = pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else TORCH_DEMO.model_dir()
    return build_llama(MLX_DEMO, out_dir, LLAMA_SHAPE, SEED, source, progress)


def build_llama(demo: DemoModel, out_dir: pathlib.Path | str, shape: dict[str, int], seed: int,
                tokenizer_dir: pathlib.Path, progress: Progress) -> pathlib.Path:
    """A seeded llama-style MLX model of the given shape with the torch demo's tokenizer: the MLX demo, and the
    benchmarks' bigger one."""
    return build_once(demo, out_dir, lambda staging: _build_into(staging, demo, shape, seed, tokenizer_dir, progress),
                      progress)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(MLX_DEMO, __doc__)
    parser.add_argument("--tokenizer-dir", type=pathlib.Path, default=None,
                        help="where to copy the tokenizer from (default: the torch demo model)")
    args = parser.parse_args(argv)
    return cli.run(MLX_DEMO, lambda progress: _build_and_check(args.out_dir, args.tokenizer_dir, progress))


def _build_and_check(out_dir: pathlib.Path, tokenizer_dir: pathlib.Path | None, progress: Progress) -> pathlib.Path:
    """A build mlx_lm cannot load would only fail later, in a worker, with less context."""
    out_dir = build_mlx_demo_model(out_dir, progress=progress, tokenizer_dir=tokenizer_dir)
    import mlx_lm  # after the build, which refuses a foreign directory even where mlx is missing

    _model, tokenizer = mlx_lm.load(str(out_dir))
    if not tokenizer.encode("Hello", add_special_tokens=False):
        raise DemoModelError(f"the tokenizer in {out_dir} encodes 'Hello' to nothing")
    return out_dir


def _build_into(staging: pathlib.Path, demo: DemoModel, shape: dict[str, int], seed: int, tokenizer_dir: pathlib.Path,
                progress: Progress) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    started = time.monotonic()
    _copy_tokenizer(tokenizer_dir, staging)
    config = _model_config(shape, *_tokenizer_facts(staging))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    parameters = sum(int(w.size) for w in weights.values())
    elapsed = time.monotonic() - started
    demo.write_seeded_marker(staging, shape, seed, parameters, tokenizer_dir, elapsed, mlx=mx.__version__)
    progress(f"{demo.label}: {parameters} parameters, vocab {config['vocab_size']}, {elapsed:.2f}s")


def _copy_tokenizer(source: pathlib.Path, staging: pathlib.Path) -> None:
    missing = [name for name in TOKENIZER_FILES if not (source / name).is_file()]
    if missing:
        raise DemoModelError(
            f"no tokenizer in {source} (missing {', '.join(missing)}); build the torch demo model first"
            f" (it is built on first use of '{TORCH_DEMO.ref}') or pass tokenizer_dir"
        )
    for name in TOKENIZER_FILES:
        shutil.copyfile(source / name, staging / name)


def _model_config(shape: dict[str, int], vocab_size: int, eos_id: int | None) -> dict[str, Any]:
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        **shape,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def _tokenizer_facts(directory: pathlib.Path) -> tuple[int, int | None]:
    """(vocab size, end-of-text id) from tokenizer.json, without importing transformers."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config: dict[str, Any] = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    eos = config.get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    eos_id = tokenizer.token_to_id(eos) if isinstance(eos, str) else None
    return tokenizer.get_vocab_size(with_added_tokens=True), eos_id


if __name__ == "__main__":
    sys.exit(main())
