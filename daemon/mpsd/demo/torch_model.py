"""Builds mpsd's demo model: a tiny GPT-2 trained from scratch, offline, in about a minute.

Shipping weights in the repository is not an option, so the first use of
'@demo' trains a small causal LM locally on standard-library docstrings
(see corpus.py); it speaks recognisable, if repetitive, English about files and
functions. Its context is 1024 tokens, like GPT-2's, because the demo exercises
long generations.

The result is an ordinary Hugging Face directory that any code using
AutoModelForCausalLM / AutoTokenizer loads unchanged; its marker (see
models.py) says it is complete. Run it as `python -m mpsd.demo.torch_model OUT_DIR`.
torch and transformers are imported inside the functions that need them, so
the daemon can import this package's light modules without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import platform
import sys
import time
from collections.abc import Iterator
from typing import Any

from mpsd.demo import cli
from mpsd.demo.corpus import END_OF_TEXT, demo_corpus, train_tokenizer
from mpsd.demo.models import TORCH_DEMO, Progress
from mpsd.demo.staging import build_once


# The model's shape, as GPT2Config takes it; also recorded in the marker.
GPT2_SHAPE = {"n_positions": 1024, "n_embd": 128, "n_layer": 3, "n_head": 4}


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    """Sized so the whole build stays under a minute on a 2-core laptop CPU."""

    vocab_size: int = 1024
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 450
    lr: float = 6e-3
    warmup_steps: int = 20
    seed: int = 0


def build_demo_model(out_dir: pathlib.Path, *, progress: Progress = print) -> pathlib.Path:
    """Builds the model into out_dir unless it is already there; returns out_dir."""
    return build_once(TORCH_DEMO, out_dir, lambda staging: _build_into(staging, TrainingPlan(), progress), progress)


def main(argv: list[str] | None = None) -> int:
    """CLI for the daemon, which must not import torch itself and so builds in a child."""
    args = cli.parser(TORCH_DEMO, __doc__).parse_args(argv)
    _quiet_transformers_progress_bars()
    return cli.run(TORCH_DEMO, lambda progress: build_demo_model(args.out_dir, progress=progress))


def _quiet_transformers_progress_bars() -> None:
    # The daemon logs our output line by line; a carriage-return progress bar is noise there.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return  # the build reports the missing dependency itself, as one line
    hf_logging.disable_progress_bar()


def _build_into(staging: pathlib.Path, plan: TrainingPlan, progress: Progress) -> None:
    import torch

    started = time.monotonic()
    corpus = demo_corpus()
    tokenizer = train_tokenizer(corpus, plan.vocab_size, GPT2_SHAPE["n_positions"])
    # The backend, not tokenizer(): that warns about exceeding model_max_length, which is expected here.
    token_ids = tokenizer.backend_tokenizer.encode(corpus).ids
    progress(f"{TORCH_DEMO.label}: corpus {len(corpus)} chars, {len(token_ids)} tokens, vocab {len(tokenizer)}")
    with _torch_threads(_cpu_count()):
        model = _new_model(plan, tokenizer)
        loss = _train(model, torch.tensor(token_ids, dtype=torch.long), plan, progress, started)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    elapsed = time.monotonic() - started
    params = sum(p.numel() for p in model.parameters())
    TORCH_DEMO.write_marker(staging, _marker_facts(plan, corpus, len(token_ids), loss, params, elapsed))
    progress(f"{TORCH_DEMO.label}: done, loss {loss:.3f}, {params} parameters, {elapsed:.1f}s")


def _new_model(plan: TrainingPlan, tokenizer: Any) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        **GPT2_SHAPE,
        # No dropout: a few hundred steps cannot overfit 100k tokens, and dropout costs time.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(plan.seed)
    return GPT2LMHeadModel(config)


def _train(model: Any, data: Any, plan: TrainingPlan, progress: Progress, started: float) -> float:
    """Returns the mean loss of the last steps, a steadier figure than the final batch's."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=0.01)
    batches = torch.Generator().manual_seed(plan.seed)
    recent: list[float] = []
    model.train()
    for step in range(plan.steps):
        _set_lr(optimizer, _lr_at(step, plan))
        loss = _step(model, optimizer, _batch(data, plan, batches))
        recent = (recent + [loss])[-10:]
        if (step + 1) % 50 == 0 or step + 1 == plan.steps:
            elapsed = time.monotonic() - started
            progress(f"{TORCH_DEMO.label}: step {step + 1}/{plan.steps} loss {loss:.3f} ({elapsed:.1f}s)")
    model.eval()
    return sum(recent) / len(recent)


def _batch(data: Any, plan: TrainingPlan, generator: Any) -> Any:
    import torch

    starts = torch.randint(len(data) - plan.seq_len, (plan.batch_size,), generator=generator)
    return torch.stack([data[i : i + plan.seq_len] for i in starts.tolist()])


def _step(model: Any, optimizer: Any, batch: Any) -> float:
    import torch

    # Computing the loss here rather than via labels= keeps transformers' loss_type warning out of the log.
    logits = model(input_ids=batch).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def _lr_at(step: int, plan: TrainingPlan) -> float:
    # Linear warmup (a high lr on random weights diverges), then linear decay to a tenth.
    warmup = min(1.0, (step + 1) / plan.warmup_steps)
    decay = 1.0 - 0.9 * step / plan.steps
    return plan.lr * warmup * decay


def _set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Uses every core for the build but restores the caller's setting: a worker may have tuned it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_count() -> int:
    # Affinity, where the OS has it, respects a container's or taskset's CPU limit.
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _marker_facts(
    plan: TrainingPlan, corpus: str, tokens: int, loss: float, params: int, seconds: float
) -> dict[str, Any]:
    """Enough to tell how the model was made and to make it again."""
    import torch
    import transformers

    return {
        "spec": {**dataclasses.asdict(plan), **GPT2_SHAPE},
        "corpus_sha256": hashlib.sha256(corpus.encode("utf-8")).hexdigest(),
        "corpus_chars": len(corpus),
        "corpus_tokens": tokens,
        "final_loss": round(loss, 4),
        "parameters": params,
        "build_seconds": round(seconds, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
