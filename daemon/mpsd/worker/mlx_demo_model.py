"""Builds a tiny MLX demo model: a llama-style mlx-lm directory with seeded random weights.

It exists to exercise the mlx-lm backend (tests, a Linux box with the MLX CPU
backend, a Mac without network access), not to produce sensible text: the
weights are random, drawn from a fixed seed, so the same MLX version always
builds the same model. The tokenizer is the torch demo model's (a byte-level
BPE, so any UTF-8 text encodes and decodes exactly), copied from
`mpsd.paths.demo_model_dir()` unless another directory is named.

The result is an ordinary mlx-lm directory (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) that `mlx_lm.load` reads unchanged;
mpsd-mlx-demo.json marks it complete. It is built in a hidden sibling
directory and renamed into place, so a crash never leaves half a model.
Run it as `python -m mpsd.worker.mlx_demo_model OUT_DIR`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

MARKER_FILE = "mpsd-mlx-demo.json"
MARKER_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
REQUIRED_FILES = ("config.json", "model.safetensors", *TOKENIZER_FILES)

Progress = Callable[[str], None]


class MlxDemoModelError(RuntimeError):
    """The MLX demo model could not be built; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class MlxDemoSpec:
    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 128
    # Small on purpose: a test can overflow it with a short prompt.
    max_position_embeddings: int = 256
    seed: int = 0


def is_mlx_demo_model_complete(out_dir: pathlib.Path) -> bool:
    out_dir = pathlib.Path(out_dir)
    try:
        marker = json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != MARKER_VERSION:
        return False
    return all((out_dir / name).is_file() for name in REQUIRED_FILES)


def build_mlx_demo_model(
    out_dir: pathlib.Path | str,
    *,
    progress: Progress = print,
    tokenizer_dir: pathlib.Path | str | None = None,
    spec: MlxDemoSpec = MlxDemoSpec(),
) -> pathlib.Path:
    """Builds the model into out_dir unless a complete one is there; returns out_dir."""
    out_dir = pathlib.Path(out_dir).absolute()
    if is_mlx_demo_model_complete(out_dir):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise MlxDemoModelError(f"{out_dir} exists and is not an MLX demo model; remove it or choose another directory")
    source = pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else _default_tokenizer_dir()
    missing = [name for name in TOKENIZER_FILES if not (source / name).is_file()]
    if missing:
        raise MlxDemoModelError(
            f"no tokenizer in {source} (missing {', '.join(missing)}); build the torch demo model first"
            " (it is built on first use of '@demo') or pass tokenizer_dir"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.mpsd-build-", dir=out_dir.parent))
    try:
        _build_into(staging, source, spec, progress)
        staging.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()  # empty, as checked above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _default_tokenizer_dir() -> pathlib.Path:
    from mpsd.paths import demo_model_dir

    return demo_model_dir()


def _build_into(staging: pathlib.Path, tokenizer_dir: pathlib.Path, spec: MlxDemoSpec, progress: Progress) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    started = time.monotonic()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, staging / name)
    vocab_size, eos_id = _tokenizer_facts(staging)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }
    args = llama.ModelArgs.from_dict(config)
    mx.random.seed(spec.seed)
    model = llama.Model(args)
    weights = dict(tree_flatten(model.parameters()))
    mx.eval(weights)
    mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    parameters = sum(int(w.size) for w in weights.values())
    elapsed = time.monotonic() - started
    marker = {
        "version": MARKER_VERSION,
        "kind": "mpsd-mlx-demo-llama",
        "spec": dataclasses.asdict(spec),
        "parameters": parameters,
        "tokenizer_from": str(tokenizer_dir),
        "mlx": mx.__version__,
        "build_seconds": round(elapsed, 2),
    }
    # Written last, so its presence says the directory is whole.
    (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    progress(f"mlx demo model: {parameters} parameters, vocab {vocab_size}, {elapsed:.2f}s")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpsd.worker.mlx_demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path, metavar="OUT_DIR", help="directory to hold the model")
    parser.add_argument("--tokenizer-dir", type=pathlib.Path, default=None,
                        help="where to copy the tokenizer from (default: the torch demo model)")
    args = parser.parse_args(argv)
    try:
        out_dir = build_mlx_demo_model(args.out_dir, progress=lambda line: print(line, flush=True),
                                       tokenizer_dir=args.tokenizer_dir)
        _check_loads(out_dir)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one readable line
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mlx demo model: error: {message}", file=sys.stderr, flush=True)
        return 1
    print(f"mlx demo model: ready in {out_dir}", flush=True)
    return 0


def _check_loads(out_dir: pathlib.Path) -> None:
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(out_dir))
    ids = tokenizer.encode("Hello", add_special_tokens=False)
    if not ids:
        raise MlxDemoModelError(f"the tokenizer in {out_dir} encodes 'Hello' to nothing")


if __name__ == "__main__":
    sys.exit(main())
