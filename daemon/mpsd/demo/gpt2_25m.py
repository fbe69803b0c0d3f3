"""Builds a ~25M-parameter untrained GPT-2 that shares the demo model's tokenizer.

The demo model (0.6M parameters) decodes over 1,000 tokens/s on one CPU
core: fast enough that per-token overheads dominate, slow test queues empty
before a test can look at them, and a benchmark says little about a real
model. This one (n_embd 512, 8 layers, 1024 positions, seeded random weights)
is a realistic size for a CPU; it decodes an order of magnitude slower
through the same loading code. Tests use it to hold a worker busy
(tests/fixtures/slow_model.py) and `python -m benchmarks --model 25m`
measures on it; neither imports the other, so it lives here.

The weights are untrained, so the text is noise, but greedy decoding is
deterministic. The result is an ordinary Hugging Face directory; its marker
(see models.py) says it is complete. Run it as
`python -m mpsd.demo.gpt2_25m OUT_DIR [--tokenizer-dir DIR]`.
"""

from __future__ import annotations

import pathlib
import sys
import time

from mpsd import paths
from mpsd.demo import cli
from mpsd.demo.models import TORCH_DEMO, DemoModel, Progress
from mpsd.demo.staging import build_once

# The model's shape, as GPT2Config takes it; also recorded in the marker.
GPT2_25M_SHAPE = {"n_positions": 1024, "n_embd": 512, "n_layer": 8, "n_head": 8}
SEED = 0

GPT2_25M = DemoModel(
    ref="@gpt2-25m", label="25M GPT-2", kind="mpsd-gpt2-25m", marker_file="mpsd-gpt2-25m.json", marker_version=1,
    builder_module="mpsd.demo.gpt2_25m",
    dir_in=lambda data_dir: (data_dir or paths.default_data_dir()) / "models" / "gpt2-25m",
)


def build_gpt2_25m(
    out_dir: pathlib.Path | str | None = None,
    *,
    tokenizer_dir: pathlib.Path | str | None = None,
    progress: Progress = print,
) -> pathlib.Path:
    """Builds the model into out_dir (default: the data dir's models/gpt2-25m) unless it is there; returns out_dir."""
    target = pathlib.Path(out_dir) if out_dir is not None else GPT2_25M.model_dir()
    source = pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else TORCH_DEMO.model_dir()
    return build_once(GPT2_25M, target, lambda staging: _build_into(staging, source, progress), progress)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(GPT2_25M, __doc__)
    parser.add_argument("--tokenizer-dir", type=pathlib.Path, default=None,
                        help="where to take the tokenizer from (default: the demo model)")
    args = parser.parse_args(argv)
    return cli.run(GPT2_25M, lambda progress: build_gpt2_25m(args.out_dir, tokenizer_dir=args.tokenizer_dir,
                                                               progress=progress))


def _build_into(staging: pathlib.Path, tokenizer_dir: pathlib.Path, progress: Progress) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    started = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    tokenizer.save_pretrained(staging)
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=len(tokenizer), **GPT2_25M_SHAPE,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(staging, safe_serialization=True)
    parameters = sum(p.numel() for p in model.parameters())
    elapsed = time.monotonic() - started
    GPT2_25M.write_seeded_marker(staging, GPT2_25M_SHAPE, SEED, parameters, tokenizer_dir, elapsed,
                                 torch=torch.__version__)
    progress(f"{GPT2_25M.label}: {parameters} parameters, vocab {len(tokenizer)}, {elapsed:.1f}s")


if __name__ == "__main__":
    sys.exit(main())
