"""The torch demo model's text and tokenizer, both made offline from what every Python carries.

mpsd must be demonstrable on a machine with no access to the Hugging Face hub,
so the text comes from the docstrings of the standard library: license-clean,
English, and the same for a given Python version.
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from collections.abc import Iterator
from typing import Any

END_OF_TEXT = "<|endoftext|>"

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


def demo_corpus() -> str:
    """Standard-library docstrings as one prose stream.

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
