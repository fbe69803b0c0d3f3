"""A Hugging Face GPT-2 directory as a GGUF file, with llama.cpp's own convert_hf_to_gguf.py.

`--convert-dir` holds convert_hf_to_gguf.py, its `conversion/` package and
`gguf-py/`, taken from the llama.cpp that llama-cpp-python's sdist vendors
(gguf_model.py fetches and extracts them), so the file matches the library that
loads it. The vendored gguf-py is used rather than PyPI's `gguf` 0.19.0: that
release has the same version number but lacks what this converter calls
(gguf.LazyChunkedTensor). The interpreter that runs this needs torch,
transformers, numpy, PyYAML and tqdm (the torch extra has them all).

Two things the converter does not take as they are, mended here without
touching the weights:

* it reads the context length from config.json's `n_ctx`, which a GPT-2 config
  written by transformers 5 no longer has (it has `n_positions`): the model is
  read from a copy of its directory with `n_ctx` added;
* it names the BPE pre-tokenizer from a hash of how the tokenizer splits a probe
  text, and refuses one it does not know. mpsd's demo tokenizer is a byte-level
  BPE with GPT-2's split regex (its pre_tokenizer is `ByteLevel`,
  `use_regex: true`), so an unrecognised hash is named "gpt-2", which is that
  pre-tokenizer.

`--chat-template FILE` puts FILE in the copy as its chat_template.jinja, which
the converter writes into the GGUF as tokenizer.chat_template.

Usage: python -m mpsd.demo.gguf_convert --convert-dir DIR --model-dir HF_DIR --outfile OUT.gguf [--outtype f32]
       [--chat-template FILE]
It runs the converter in this process (it parses sys.argv and patches a module),
so it is meant to run as a child, as gguf_model.convert runs it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import runpy
import shutil
import sys
import tempfile


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpsd.demo.gguf_convert", description=__doc__.splitlines()[0])
    parser.add_argument("--convert-dir", required=True, type=pathlib.Path,
                        help="holds convert_hf_to_gguf.py, conversion/ and gguf-py/")
    parser.add_argument("--model-dir", required=True, type=pathlib.Path, help="the Hugging Face model directory")
    parser.add_argument("--outfile", required=True, type=pathlib.Path)
    parser.add_argument("--outtype", default="f32", help="as convert_hf_to_gguf.py takes it (default f32: the same "
                                                         "weights)")
    parser.add_argument("--chat-template", type=pathlib.Path, help="a Jinja file to convert as the model's chat "
                                                                     "template (default: the directory's own)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpsd-gguf-") as temp:
        copy = pathlib.Path(temp) / args.model_dir.name
        shutil.copytree(args.model_dir, copy)
        config = json.loads((copy / "config.json").read_text(encoding="utf-8"))
        config.setdefault("n_ctx", config.get("n_positions", 1024))
        (copy / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
        if args.chat_template is not None:
            shutil.copyfile(args.chat_template, copy / "chat_template.jinja")
        sys.path[:0] = [str(args.convert_dir), str(args.convert_dir / "gguf-py")]
        _name_unknown_pre_tokenizer_gpt2()
        sys.argv = ["convert_hf_to_gguf.py", str(copy), "--outfile", str(args.outfile), "--outtype", args.outtype]
        runpy.run_path(str(args.convert_dir / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


def _name_unknown_pre_tokenizer_gpt2() -> None:
    from conversion import base  # the converter's own package, on sys.path from --convert-dir

    known = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return known(self, tokenizer)
        except NotImplementedError:
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_base_pre


if __name__ == "__main__":
    sys.exit(main())
