"""The models a run measures (`--model demo|25m`): a torch directory and an MLX directory of the same size class.

`demo` is mpsd's own demo pair (the 0.6M trained GPT-2 and the tiny MLX
llama). `25m` is the realistic size for a CPU: the 25M untrained GPT-2 that
tests also use (mpsd.demo.gpt2_25m), and a llama-style MLX model of the same
width and depth built here, with seeded random weights, the way
mpsd.demo.mlx_model builds the MLX demo (a bigger config of the same kind).
Every model is built locally on first use and reused after.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys

from mpsd import paths
from mpsd.demo.models import DemoModel, Progress

MODEL_CHOICES = ("demo", "25m")

# hidden 512 x 8 layers like the 25M GPT-2; the MLP width brings it to about the same 26M parameters.
MLX_25M_SHAPE = dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                     intermediate_size=1408, max_position_embeddings=1024)
MLX_25M_SEED = 0

MLX_25M = DemoModel(
    ref="@mlx-25m", label="25M MLX llama", kind="mpsd-bench-mlx-llama-25m", marker_file="mpsd-mlx-25m.json",
    marker_version=1, builder_module="benchmarks.models",
    dir_in=lambda data_dir: (data_dir or paths.default_data_dir()) / "models" / "mlx-llama-25m",
)


@dataclasses.dataclass(frozen=True)
class BenchModel:
    name: str        # "demo" or "25m"
    torch_dir: str   # a Hugging Face GPT-2 directory: torch-lm, in-process, LitServe, Ray Serve
    mlx_dir: str     # an mlx-lm llama directory, or "" when mlx-lm is not installed: mlx-lm workers, mlx_lm.server


def resolve(name: str, progress: Progress, torch_dir: str | None = None) -> BenchModel:
    """Builds what is missing; torch_dir overrides the torch model (--model-dir)."""
    demo_dir = paths.demo_model_dir()
    if not (demo_dir / "config.json").is_file():   # every model here borrows its tokenizer
        progress("building the demo model (first use)")
        subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "build-demo"], check=True, timeout=900)
    if name == "demo":
        default_torch, mlx = str(demo_dir), _mlx_demo(progress)
    elif name == "25m":
        from mpsd.demo.gpt2_25m import build_gpt2_25m

        default_torch = str(build_gpt2_25m(tokenizer_dir=demo_dir, progress=progress))
        mlx = str(build_mlx_25m(demo_dir, progress)) if _has_mlx() else ""
    else:
        raise ValueError(f"model: one of {', '.join(MODEL_CHOICES)}, got {name!r}")
    return BenchModel(name, torch_dir or default_torch, mlx)


def _mlx_demo(progress: Progress) -> str:
    if not _has_mlx():
        return ""
    directory = paths.mlx_demo_model_dir()
    if not (directory / "config.json").is_file():
        progress("building the MLX demo model (first use)")
        subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "build-demo", "--mlx"], check=True, timeout=900)
    return str(directory)


def _has_mlx() -> bool:
    try:
        import mlx.core  # noqa: F401
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


def build_mlx_25m(tokenizer_dir: pathlib.Path, progress: Progress) -> pathlib.Path:
    from mpsd.demo.mlx_model import build_llama

    return build_llama(MLX_25M, MLX_25M.model_dir(), MLX_25M_SHAPE, MLX_25M_SEED, tokenizer_dir, progress)
