"""The demo models mpsd knows, and the one test of whether a directory holds a whole one.

The daemon reads this to resolve '@demo' / '@mlx-demo' / '@gguf-demo' and to
skip builds already done; the builders read it to write the marker the daemon
checks. Both sides asking the same question one way is the point, so it
imports neither torch nor mlx.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable
from typing import Any

from mpsd import paths

# Files whose absence means a directory is not a loadable model, marker or not (a Hugging Face or mlx-lm directory).
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
# The GGUF demo's one file: weights, tokenizer and chat template together.
GGUF_DEMO_FILE = "demo-gpt2-f32.gguf"

Progress = Callable[[str], None]


class DemoModelError(RuntimeError):
    """A demo model could not be built; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """One demo model: its config reference, where it lives, how it is built and marked complete."""

    ref: str
    label: str
    kind: str
    marker_file: str
    # Bump only when an older build can no longer be served: a bump makes every existing one rebuild.
    marker_version: int
    builder_module: str
    dir_in: Callable[[pathlib.Path | None], pathlib.Path]
    # What a complete build holds besides its marker.
    model_files: tuple[str, ...] = MODEL_FILES
    # The file in the directory that a config's reference means, for a model that is one file (GGUF); None: the
    # directory itself.
    served_file: str | None = None

    def model_dir(self, data_dir: pathlib.Path | None = None) -> pathlib.Path:
        """Where it is built (staged and renamed into place as a whole)."""
        return self.dir_in(data_dir)

    def served_path(self, data_dir: pathlib.Path | None = None) -> pathlib.Path:
        """What its reference resolves to in a config: the directory, or the one file in it."""
        model_dir = self.model_dir(data_dir)
        return model_dir / self.served_file if self.served_file else model_dir

    def read_marker(self, model_dir: pathlib.Path) -> dict[str, Any] | None:
        """Any marker of this model, at any version: what makes a directory safe to replace."""
        try:
            data = json.loads((pathlib.Path(model_dir) / self.marker_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def is_complete(self, model_dir: pathlib.Path) -> bool:
        """True only for a directory a finished build renamed into place, at this format version."""
        marker = self.read_marker(model_dir)
        if marker is None or marker.get("version") != self.marker_version:
            return False
        return all((pathlib.Path(model_dir) / name).is_file() for name in self.model_files)

    def write_marker(self, staging: pathlib.Path, facts: dict[str, Any]) -> None:
        """Written last, so its presence alone says the directory is whole; facts record how it was built."""
        marker = {**facts, "version": self.marker_version, "kind": self.kind}
        (staging / self.marker_file).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def write_seeded_marker(self, staging: pathlib.Path, shape: dict[str, int], seed: int, parameters: int,
                            tokenizer_from: pathlib.Path, elapsed_s: float, **versions: str) -> None:
        """The marker of a model made of seeded random weights: its shape and seed rebuild it exactly."""
        self.write_marker(staging, {"spec": {**shape, "seed": seed}, "parameters": parameters,
                                    "tokenizer_from": str(tokenizer_from), "build_seconds": round(elapsed_s, 2),
                                    **versions})


TORCH_DEMO = DemoModel(ref=paths.DEMO_MODEL_REF, label="demo model", dir_in=paths.demo_model_dir,
                       builder_module="mpsd.demo.torch_model",
                       marker_file="mpsd-demo.json", marker_version=1, kind="mpsd-demo-gpt2")
MLX_DEMO = DemoModel(ref=paths.MLX_DEMO_MODEL_REF, label="MLX demo model", dir_in=paths.mlx_demo_model_dir,
                     builder_module="mpsd.demo.mlx_model",
                     marker_file="mpsd-mlx-demo.json", marker_version=1, kind="mpsd-mlx-demo-llama")
# The torch demo's weights and tokenizer as one GGUF file (llama.cpp's converter; python -m mpsd.demo.gguf_model).
GGUF_DEMO = DemoModel(ref=paths.GGUF_DEMO_MODEL_REF, label="GGUF demo model", dir_in=paths.gguf_demo_model_dir,
                      builder_module="mpsd.demo.gguf_model",
                      marker_file="mpsd-gguf-demo.json", marker_version=1, kind="mpsd-demo-gpt2-gguf",
                      model_files=(GGUF_DEMO_FILE,), served_file=GGUF_DEMO_FILE)
# In build order: the MLX demo borrows the torch demo's tokenizer, the GGUF demo is the torch demo converted.
DEMO_MODELS = {demo.ref: demo for demo in (TORCH_DEMO, MLX_DEMO, GGUF_DEMO)}


def resolve_demo_ref(path: str, data_dir: pathlib.Path | None = None) -> str:
    """A config's model path with a demo reference replaced by what it means (GGUF_DEMO: the .gguf file itself,
    so a rule that picks an engine by a path's suffix sees it); any other path unchanged."""
    demo = DEMO_MODELS.get(path)
    return str(demo.served_path(data_dir)) if demo else path
