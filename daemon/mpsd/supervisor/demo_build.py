"""Resolves the demo references in a config and builds the demo models on first use, in a child process.

The builders need torch or mlx, which the daemon must never import, so each
runs as `python -m <its builder module> DIR`; its progress lines go to the log.
Whether a model is already there is decided by the same check the builders use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import sys

from mpsd import paths
from mpsd.config import Config
from mpsd.demo import DEMO_MODELS, GGUF_DEMO, MLX_DEMO, TORCH_DEMO, DemoModel
from mpsd.demo.chat_template import install_chat_template

log = logging.getLogger("mpsd.demo")


class DemoBuildFailed(RuntimeError):
    pass


def resolve_demo_paths(config: Config, data_dir: pathlib.Path) -> tuple[Config, list[str]]:
    """Replaces '@demo' / '@mlx-demo' with the built models' directories ('@gguf-demo' with its .gguf file);
    returns the references used."""
    used = sorted({m.path for m in config.models if m.path in DEMO_MODELS})
    models = tuple(
        dataclasses.replace(m, path=str(DEMO_MODELS[m.path].served_path(data_dir))) if m.path in DEMO_MODELS else m
        for m in config.models
    )
    return dataclasses.replace(config, models=models), used


async def ensure_demos(refs: list[str], data_dir: pathlib.Path, env: dict[str, str]) -> None:
    """The torch demo whenever any demo is used: the MLX demo borrows its tokenizer, the GGUF demo is it converted
    (with llama.cpp's converter, fetched once from llama-cpp-python's sdist)."""
    if not refs:
        return
    torch_dir = TORCH_DEMO.model_dir(data_dir)
    await _ensure(TORCH_DEMO, torch_dir, [], env)
    if MLX_DEMO.ref in refs:
        await _ensure(MLX_DEMO, MLX_DEMO.model_dir(data_dir), ["--tokenizer-dir", str(torch_dir)], env)
    if GGUF_DEMO.ref in refs:
        await _ensure(GGUF_DEMO, GGUF_DEMO.model_dir(data_dir),
                      ["--source-dir", str(torch_dir), "--cache-dir", str(paths.cache_dir(data_dir))], env)


async def _ensure(demo: DemoModel, model_dir: pathlib.Path, options: list[str], env: dict[str, str]) -> None:
    if not demo.is_complete(model_dir):
        log.info("building the %s in %s (first use only)", demo.label, model_dir)
        await _run_builder(demo, [str(model_dir), *options], env)
        if not demo.is_complete(model_dir):
            raise DemoBuildFailed(f"building the {demo.label} left no complete model")
    if not demo.served_file and install_chat_template(model_dir):  # a GGUF carries its template inside
        log.info("installed the demo chat template in %s", model_dir)


async def _run_builder(demo: DemoModel, builder_args: list[str], env: dict[str, str]) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", demo.builder_module, *builder_args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    last_lines: list[str] = []
    while line := await process.stdout.readline():
        text = line.decode("utf-8", "replace").rstrip()
        last_lines = (last_lines + [text])[-5:]
        log.info("%s build | %s", demo.label, text)
    if await process.wait() != 0:
        raise DemoBuildFailed(f"building the {demo.label} failed: " + " / ".join(last_lines))
