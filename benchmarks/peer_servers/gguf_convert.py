"""A Hugging Face GPT-2 directory as a GGUF file, with llama.cpp's own convert_hf_to_gguf.py (run in the llama-cpp
peer venv, which has torch and the `gguf` package).

`--convert-dir` holds convert_hf_to_gguf.py, its `conversion/` package and `gguf-py/`, taken from the llama.cpp
that llama-cpp-python's sdist vendors (benchmarks/multi_turn_peers.py extracts them), so the file matches the
library that loads it. The vendored gguf-py is used rather than PyPI's `gguf` 0.19.0: that release has the same
version number but lacks what this converter calls (gguf.LazyChunkedTensor). Two things the converter does not take as they are, mended here without touching the weights:

* it reads the context length from config.json's `n_ctx`, which a GPT-2 config written by transformers 5 no
  longer has (it has `n_positions`): the model is read from a copy of its directory with `n_ctx` added;
* it names the BPE pre-tokenizer from a hash of how the tokenizer splits a probe text, and refuses one it does
  not know. mpsd's demo tokenizer is a byte-level BPE with GPT-2's split regex (its pre_tokenizer is `ByteLevel`,
  `use_regex: true`), so an unrecognised hash is named "gpt-2", which is that pre-tokenizer.

Usage: python gguf_convert.py --convert-dir DIR --model-dir HF_DIR --outfile OUT.gguf
"""

from __future__ import annotations

import argparse
import json
import pathlib
import runpy
import shutil
import sys
import tempfile


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--convert-dir", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--outfile", required=True)
    args = parser.parse_args()
    source = pathlib.Path(args.model_dir)
    with tempfile.TemporaryDirectory(prefix="mpsd-gguf-") as temp:
        copy = pathlib.Path(temp) / source.name
        shutil.copytree(source, copy)
        config = json.loads((copy / "config.json").read_text())
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (copy / "config.json").write_text(json.dumps(config, indent=1))
        sys.path[:0] = [args.convert_dir, str(pathlib.Path(args.convert_dir) / "gguf-py")]
        from conversion import base

        known = base.TextModel.get_vocab_base_pre

        def vocab_base_pre(self, tokenizer) -> str:
            try:
                return known(self, tokenizer)
            except NotImplementedError:
                return "gpt-2"

        base.TextModel.get_vocab_base_pre = vocab_base_pre
        sys.argv = ["convert_hf_to_gguf.py", str(copy), "--outfile", args.outfile, "--outtype", "f32"]
        runpy.run_path(str(pathlib.Path(args.convert_dir) / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
