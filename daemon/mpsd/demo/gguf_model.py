"""Builds the GGUF demo model: the torch demo GPT-2 written out as one GGUF file (f32, the same weights).

It exists so the llama.cpp path (llama-cpp-python, the `llama-cpp` extra,
`./dev llama-cpp`) has a model built locally like the other demos, with no
weights in the repository. The conversion is llama.cpp's own
convert_hf_to_gguf.py from the llama.cpp that llama-cpp-python's sdist vendors,
at the version the `llama-cpp` extra pins (LLAMA_CPP_PYTHON_VERSION), so the
file matches the library that loads it. The first build fetches that sdist with
`pip download` (77 MB; the only step that needs the network) and keeps the
converter's parts (2 MB) in the data directory's cache/, for every later build.

The converter runs in a child of this interpreter (`python -m
mpsd.demo.gguf_convert`, which says what it mends), and needs the torch extra
(torch, transformers, numpy, PyYAML, tqdm); this module imports none of them.
The torch demo must be complete first; the GGUF carries its tokenizer and the
demo chat template. The result is a directory holding the .gguf file and the
marker (see models.py); '@gguf-demo' means the file. Run it as
`python -m mpsd.demo.gguf_model OUT_DIR [--source-dir DIR] [--cache-dir DIR]`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import platform
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Any

from mpsd import paths
from mpsd.demo import cli
from mpsd.demo.chat_template import DEMO_CHAT_TEMPLATE
from mpsd.demo.models import GGUF_DEMO, GGUF_DEMO_FILE, TORCH_DEMO, DemoModelError, Progress
from mpsd.demo.staging import build_once, exclusive_lock

# The llama-cpp extra's pin (pyproject.toml, constraints.txt): the converter comes from the same release.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
# What the converter needs from the sdist's vendor/llama.cpp/.
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
# What the converter imports in its child (gguf-py's own needs included; it imports requests only to download).
CONVERTER_MODULES = ("torch", "transformers", "numpy", "yaml", "tqdm")
OUTTYPE = "f32"
FETCH_TIMEOUT_S = 600
CONVERT_TIMEOUT_S = 600
GGUF_MAGIC = b"GGUF"
DAEMON_ROOT = pathlib.Path(__file__).resolve().parents[2]


def build_gguf_demo_model(
    out_dir: pathlib.Path | str,
    *,
    progress: Progress = print,
    source_dir: pathlib.Path | str | None = None,
    cache_dir: pathlib.Path | str | None = None,
) -> pathlib.Path:
    """Builds the GGUF file into out_dir unless a complete build is there; returns out_dir.

    source_dir: the torch demo to convert (default: its default directory); cache_dir: where llama.cpp's
    converter is kept (default: the data directory's cache/)."""
    source = pathlib.Path(source_dir) if source_dir is not None else TORCH_DEMO.model_dir()
    cache = pathlib.Path(cache_dir) if cache_dir is not None else paths.cache_dir()
    return build_once(GGUF_DEMO, out_dir, lambda staging: _build_into(staging, source, cache, progress), progress)


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser(GGUF_DEMO, __doc__)
    parser.add_argument("--source-dir", type=pathlib.Path, default=None,
                        help="the torch demo model to convert (default: its default directory)")
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help="where llama.cpp's converter is kept (default: the data directory's cache/)")
    args = parser.parse_args(argv)
    return cli.run(GGUF_DEMO, lambda progress: build_gguf_demo_model(
        args.out_dir, progress=progress, source_dir=args.source_dir, cache_dir=args.cache_dir))


# ---------------------------------------------------------------- llama.cpp's converter


def converter_dir(cache_dir: pathlib.Path | str) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}-convert"


def has_converter(cache_dir: pathlib.Path | str) -> bool:
    root = converter_dir(cache_dir)
    return all((root / name).is_file()
               for name in ("convert_hf_to_gguf.py", "conversion/base.py", "gguf-py/gguf/__init__.py"))


def converter_problem(cache_dir: pathlib.Path | str) -> str | None:
    """Why this interpreter cannot convert without fetching anything first; None when it can."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"llama.cpp's converter needs {', '.join(missing)} (the torch extra)"
    if not has_converter(cache_dir):
        return (f"llama.cpp's converter is not in {converter_dir(cache_dir)} (`mpsd build-demo --gguf` fetches it "
                f"from llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s sdist)")
    return None


def ensure_converter(cache_dir: pathlib.Path | str, progress: Progress, python: str = sys.executable) -> pathlib.Path:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist's vendored llama.cpp, fetched once (under a
    lock, staged and renamed into place); returns their directory. Raises DemoModelError."""
    root = converter_dir(cache_dir)
    if has_converter(cache_dir):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(root.parent / f".{root.name}.lock"):
        if has_converter(cache_dir):
            return root
        progress(f"{GGUF_DEMO.label}: fetching llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s sdist for llama.cpp's "
                 f"converter (once, into {root.parent})")
        with tempfile.TemporaryDirectory(prefix=f".{root.name}.fetch-", dir=root.parent) as temp:
            archive = _download_sdist(pathlib.Path(temp), python)
            staging = pathlib.Path(temp) / "convert"
            _extract_converter(archive, staging)
            if root.exists():
                shutil.rmtree(root)  # an incomplete one: has_converter said so
            os.replace(staging, root)
    return root


def _download_sdist(dest: pathlib.Path, python: str) -> pathlib.Path:
    command = [python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
               "--no-input", "-d", str(dest), f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"]
    try:
        result = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DemoModelError(f"pip download of llama-cpp-python's sdist took over {FETCH_TIMEOUT_S}s") from None
    archives = sorted(dest.glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"))
    if result.returncode != 0 or not archives:
        raise DemoModelError(f"could not fetch llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s sdist with pip "
                             f"download: {last_line(result.stderr or result.stdout)}")
    return archives[0]


def _extract_converter(archive: pathlib.Path, staging: pathlib.Path) -> None:
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                   and m.name[len(prefix):].startswith(CONVERTER_PARTS) and (m.isfile() or m.isdir())]
        if not members:
            raise DemoModelError(f"{archive.name} holds no {prefix}convert_hf_to_gguf.py")
        for member in members:
            member.name = member.name[len(prefix):]
        # The "data" filter (3.11.4+) refuses links and paths out of staging.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(staging, members=members, **extra)


def convert(model_dir: pathlib.Path | str, outfile: pathlib.Path | str, converter: pathlib.Path, *,
            python: str = sys.executable, chat_template: pathlib.Path | None = None,
            log_path: pathlib.Path | None = None, timeout_s: float = CONVERT_TIMEOUT_S) -> None:
    """A Hugging Face directory as a GGUF file (f32), by llama.cpp's converter in a child of python; log_path
    keeps its output. Raises DemoModelError naming the converter's last line."""
    outfile = pathlib.Path(outfile)
    command = [python, "-m", "mpsd.demo.gguf_convert", "--convert-dir", str(converter), "--model-dir",
               str(model_dir), "--outfile", str(outfile), "--outtype", OUTTYPE]
    if chat_template is not None:
        command += ["--chat-template", str(chat_template)]
    # This package on the child's path even where it is not installed (a test's PYTHONPATH).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(DAEMON_ROOT), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])}
    try:
        result = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        raise DemoModelError(f"llama.cpp's converter took over {timeout_s:.0f}s on {model_dir}") from None
    if log_path is not None:
        pathlib.Path(log_path).write_text(result.stdout + result.stderr, encoding="utf-8")
    if result.returncode != 0 or not outfile.is_file():
        raise DemoModelError(f"llama.cpp's converter failed on {model_dir}: "
                             f"{last_line(result.stderr or result.stdout)}")


def read_header(path: pathlib.Path | str) -> dict[str, int]:
    """A GGUF file's version and counts, from its first 24 bytes; raises DemoModelError for anything else."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise DemoModelError(f"{path} is not a GGUF file")
    version, tensors, metadata_keys = struct.unpack("<IQQ", head[4:])
    return {"version": version, "tensors": tensors, "metadata_keys": metadata_keys}


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return (errors or lines or ["(no output)"])[-1][:400]


# ---------------------------------------------------------------- the build


def _build_into(staging: pathlib.Path, source: pathlib.Path, cache_dir: pathlib.Path, progress: Progress) -> None:
    started = time.monotonic()
    if not TORCH_DEMO.is_complete(source):
        raise DemoModelError(f"no complete {TORCH_DEMO.label} in {source}: build it first (`mpsd build-demo`, or the "
                             f"first use of '{TORCH_DEMO.ref}') or pass --source-dir")
    converter = ensure_converter(cache_dir, progress)
    out = staging / GGUF_DEMO_FILE
    progress(f"{GGUF_DEMO.label}: converting {source} to GGUF ({OUTTYPE}) with llama.cpp's convert_hf_to_gguf.py")
    with tempfile.TemporaryDirectory(prefix="mpsd-gguf-template-") as temp:
        template = pathlib.Path(temp) / "chat_template.jinja"
        template.write_text(DEMO_CHAT_TEMPLATE, encoding="utf-8")
        convert(source, out, converter, chat_template=template)
    out.chmod(0o644)
    header = read_header(out)
    if header["tensors"] == 0:
        raise DemoModelError(f"the converter wrote {out.name} with no tensors")
    elapsed = time.monotonic() - started
    GGUF_DEMO.write_marker(staging, _marker_facts(source, out, header, elapsed))
    progress(f"{GGUF_DEMO.label}: done, {out.stat().st_size} bytes, {header['tensors']} tensors, {elapsed:.1f}s")


def _marker_facts(source: pathlib.Path, out: pathlib.Path, header: dict[str, int], seconds: float) -> dict[str, Any]:
    """Enough to tell which torch build it was converted from, by what, and to check the file."""
    source_marker = TORCH_DEMO.read_marker(source) or {}
    return {
        "source": {"dir": str(source), "weights_sha256": _sha256(source / "model.safetensors"),
                   **{key: source_marker[key] for key in ("corpus_sha256", "final_loss", "parameters")
                      if key in source_marker}},
        "gguf": {"file": out.name, "bytes": out.stat().st_size, "sha256": _sha256(out), **header},
        "outtype": OUTTYPE,
        "converter": f"convert_hf_to_gguf.py of llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}'s vendored llama.cpp",
        "build_seconds": round(seconds, 2),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "transformers")},
    }


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


if __name__ == "__main__":
    sys.exit(main())
