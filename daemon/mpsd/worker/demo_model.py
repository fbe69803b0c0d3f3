"""Builds mpsd's demo model: a tiny GPT-2 trained from scratch, offline, in about a minute.

mpsd must be demonstrable on a machine with no access to the Hugging Face hub,
and shipping weights in the repository is not an option, so the first use of
'@demo' trains a small causal LM locally. Its text comes from the docstrings of
the standard library, which every Python install carries, so the model speaks
recognisable (if repetitive) English about files and functions. Its context is
1024 tokens, like GPT-2's, because the demo exercises long generations.

The result is an ordinary Hugging Face directory (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json) that any code using
AutoModelForCausalLM / AutoTokenizer loads unchanged; mpsd-demo.json marks it
complete. Run it as `python -m mpsd.worker.demo_model OUT_DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib
import inspect
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

MARKER_FILE = "mpsd-demo.json"
MARKER_VERSION = 1
END_OF_TEXT = "<|endoftext|>"
# Files whose absence means a directory is not a loadable model, marker or not.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Sorted and fixed so the corpus, and thus the model, depends only on the Python version.
# Only pure, side-effect-free imports: the builder may run inside a worker process.
CORPUS_MODULES = tuple(sorted("""
    abc argparse array asyncio base64 bisect calendar collections contextlib copy csv
    dataclasses datetime decimal difflib email enum fractions functools getopt gettext
    glob gzip hashlib heapq hmac html http.client http.server imaplib inspect io
    ipaddress itertools json logging mailbox math mimetypes numbers operator optparse os
    pathlib pickle pprint queue random re sched secrets selectors shelve shlex shutil
    signal smtplib socket socketserver sqlite3 statistics string struct subprocess
    tarfile tempfile textwrap threading timeit tokenize traceback types typing unittest
    urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile zlib
""".split()))

Progress = Callable[[str], None]


class DemoModelError(RuntimeError):
    """The demo model could not be built; the message says why in one line."""


@dataclasses.dataclass(frozen=True)
class DemoSpec:
    """Sized so the whole build stays under a minute on a 2-core laptop CPU."""

    vocab_size: int = 1024
    n_positions: int = 1024
    n_embd: int = 128
    n_layer: int = 3
    n_head: int = 4
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 450
    lr: float = 6e-3
    warmup_steps: int = 20
    seed: int = 0


# ---------------------------------------------------------------- public entry points


def is_demo_model_complete(out_dir: pathlib.Path) -> bool:
    """True only for a directory a finished build renamed into place, at this format version."""
    marker = _read_marker(pathlib.Path(out_dir))
    if marker is None or marker.get("version") != MARKER_VERSION:
        return False
    return all((pathlib.Path(out_dir) / name).is_file() for name in REQUIRED_FILES)


def build_demo_model(out_dir: pathlib.Path, *, progress: Progress = print) -> None:
    """Builds the model into out_dir unless it is already there.

    The build happens in a hidden sibling directory that is renamed into place
    only when complete, so a crash never leaves a half model behind, and a lock
    file next to out_dir makes a second concurrent builder wait and then reuse
    the first one's result instead of training twice.
    """
    out_dir = pathlib.Path(out_dir).absolute()
    if is_demo_model_complete(out_dir):
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(_lock_path(out_dir)):
        if is_demo_model_complete(out_dir):
            progress(f"demo model: already built by another process in {out_dir}")
            return
        _refuse_foreign(out_dir)  # before a minute of training, not after
        _remove_stale_builds(out_dir)
        _build_and_install(out_dir, DemoSpec(), progress)


def main(argv: list[str] | None = None) -> int:
    """CLI for the supervisor, which must not import torch itself and so builds in a child."""
    parser = argparse.ArgumentParser(prog="python -m mpsd.worker.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path, metavar="OUT_DIR", help="directory to hold the model")
    args = parser.parse_args(argv)
    _quiet_transformers_progress_bars()
    try:
        # Flush each line: the supervisor reads them from a pipe as they come.
        build_demo_model(args.out_dir, progress=lambda line: print(line, flush=True))
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is one readable line, not a traceback
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"demo model: error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


def _quiet_transformers_progress_bars() -> None:
    # The supervisor logs our output line by line; a carriage-return progress bar is noise there.
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return  # the build reports the missing dependency itself, as one line
    hf_logging.disable_progress_bar()


# ---------------------------------------------------------------- locking and atomic install


def _lock_path(out_dir: pathlib.Path) -> pathlib.Path:
    # Beside out_dir, not inside it: out_dir itself is replaced by a rename.
    return out_dir.parent / f".{out_dir.name}.lock"


def _temp_prefix(out_dir: pathlib.Path) -> str:
    return f".{out_dir.name}.mpsd-build-"


@contextlib.contextmanager
def _exclusive_lock(path: pathlib.Path) -> Iterator[None]:
    """flock, because the kernel drops it when a builder dies, so no stale lock ever blocks."""
    # The lock file is never deleted: unlinking it would let two builders lock different inodes.
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_builds(out_dir: pathlib.Path) -> None:
    """Clears what crashed builders left; safe because we hold the lock, so none is still running."""
    # mkdtemp appends exactly 8 characters; matching them keeps other models' temp dirs out.
    pattern = re.compile(re.escape(_temp_prefix(out_dir)) + r"[A-Za-z0-9_]{8}")
    for entry in out_dir.parent.iterdir():
        if pattern.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _build_and_install(out_dir: pathlib.Path, spec: DemoSpec, progress: Progress) -> None:
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
    try:
        _build_into(staging, spec, progress)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other local users
        _fsync_tree(staging)
        _move_into_place(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _refuse_foreign(out_dir: pathlib.Path) -> None:
    """Only an empty directory or an older demo build may be replaced; anything else may be a user's data."""
    if not out_dir.exists() or _read_marker(out_dir) is not None:
        return
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        return
    raise DemoModelError(f"{out_dir} exists and is not a demo model; remove it or choose another directory")


def _move_into_place(staging: pathlib.Path, out_dir: pathlib.Path) -> None:
    _refuse_foreign(out_dir)
    if _read_marker(out_dir) is not None:
        retired = pathlib.Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), dir=out_dir.parent))
        os.replace(out_dir, retired)  # rename(2) onto the empty retired dir; removed below
        shutil.rmtree(retired, ignore_errors=True)
    elif out_dir.exists():
        out_dir.rmdir()  # empty, as _refuse_foreign checked
    os.replace(staging, out_dir)
    _fsync_dir(out_dir.parent)


def _fsync_tree(root: pathlib.Path) -> None:
    # Without this a power cut right after the rename could leave the marker but empty weights.
    for path in root.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_marker(out_dir: pathlib.Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out_dir / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- corpus


def demo_corpus() -> str:
    """Standard-library docstrings as one prose stream: offline, license-clean, and English.

    Indented blocks and doctests are dropped because code teaches a model this
    small little but punctuation. Paragraphs are joined by newlines only, with no
    end-of-text tokens between them, so generation runs long instead of stopping.
    """
    seen: set[str] = set()
    paragraphs: list[str] = []
    for doc in _docstrings():
        for paragraph in _prose_paragraphs(doc):
            if paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    return "\n".join(paragraphs)


def _docstrings() -> Iterator[str]:
    # Touching every public name trips deprecation shims (typing.re, ...); they are not our users' concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield from _module_docstrings()


def _module_docstrings() -> Iterator[str]:
    for name in CORPUS_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. a Python built without sqlite3; the rest still makes a corpus
            continue
        objects = [module] + [getattr(module, attr, None) for attr in sorted(dir(module)) if not attr.startswith("_")]
        for obj in objects:
            if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
                doc = inspect.getdoc(obj)
                if doc:
                    yield doc.encode("ascii", "ignore").decode("ascii")


def _prose_paragraphs(doc: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", doc):
        lines = block.split("\n")
        if any(line.startswith((" ", "\t")) or ">>>" in line for line in lines):
            continue
        text = " ".join(block.split())
        letters = sum(ch.isalpha() for ch in text)
        if len(text) >= 40 and letters >= 0.7 * len(text):
            yield text


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(corpus: str, vocab_size: int, max_length: int) -> Any:
    """Byte-level BPE, so any UTF-8 input (accents, emoji) encodes and decodes exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([corpus], trainer=trainer)
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # it would rewrite " ." and similar, breaking round trips
    )


# ---------------------------------------------------------------- model


def _build_into(staging: pathlib.Path, spec: DemoSpec, progress: Progress) -> None:
    import torch

    started = time.monotonic()
    corpus = demo_corpus()
    tokenizer = train_tokenizer(corpus, spec.vocab_size, spec.n_positions)
    # The backend, not tokenizer(): that warns about exceeding model_max_length, which is expected here.
    token_ids = tokenizer.backend_tokenizer.encode(corpus).ids
    progress(f"demo model: corpus {len(corpus)} chars, {len(token_ids)} tokens, vocab {len(tokenizer)}")
    with _torch_threads(_cpu_count()):
        model = _new_model(spec, tokenizer)
        loss = _train(model, torch.tensor(token_ids, dtype=torch.long), spec, progress, started)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    elapsed = time.monotonic() - started
    params = sum(p.numel() for p in model.parameters())
    _write_marker(staging, spec, corpus, len(token_ids), loss, params, elapsed)
    progress(f"demo model: done, loss {loss:.3f}, {params} parameters, {elapsed:.1f}s")


def _new_model(spec: DemoSpec, tokenizer: Any) -> Any:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=spec.n_positions,
        n_embd=spec.n_embd,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        # No dropout: a few hundred steps cannot overfit 100k tokens, and dropout costs time.
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    torch.manual_seed(spec.seed)
    return GPT2LMHeadModel(config)


def _train(model: Any, data: Any, spec: DemoSpec, progress: Progress, started: float) -> float:
    """Returns the mean loss of the last steps, a steadier figure than the final batch's."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01)
    batches = torch.Generator().manual_seed(spec.seed)
    recent: list[float] = []
    model.train()
    for step in range(spec.steps):
        _set_lr(optimizer, _lr_at(step, spec))
        loss = _step(model, optimizer, _batch(data, spec, batches))
        recent = (recent + [loss])[-10:]
        if (step + 1) % 50 == 0 or step + 1 == spec.steps:
            progress(f"demo model: step {step + 1}/{spec.steps} loss {loss:.3f} ({time.monotonic() - started:.1f}s)")
    model.eval()
    return sum(recent) / len(recent)


def _batch(data: Any, spec: DemoSpec, generator: Any) -> Any:
    import torch

    starts = torch.randint(len(data) - spec.seq_len, (spec.batch_size,), generator=generator)
    return torch.stack([data[i : i + spec.seq_len] for i in starts.tolist()])


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


def _lr_at(step: int, spec: DemoSpec) -> float:
    # Linear warmup (a high lr on random weights diverges), then linear decay to a tenth.
    warmup = min(1.0, (step + 1) / spec.warmup_steps)
    decay = 1.0 - 0.9 * step / spec.steps
    return spec.lr * warmup * decay


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


def _write_marker(
    staging: pathlib.Path, spec: DemoSpec, corpus: str, tokens: int, loss: float, params: int, seconds: float
) -> None:
    """Written last, so its presence alone says the directory is whole; also records how to rebuild."""
    import torch
    import transformers

    marker = {
        "version": MARKER_VERSION,
        "kind": "mpsd-demo-gpt2",
        "spec": dataclasses.asdict(spec),
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
    (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
