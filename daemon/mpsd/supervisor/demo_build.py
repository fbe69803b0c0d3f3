"""Builds the demo model on first use, in a child process.

The builder needs torch, which the daemon must never import, so it runs as
`python -m mpsd.worker.demo_model DIR`; its progress lines go to the log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import sys

from mpsd import paths
from mpsd.config import Config

log = logging.getLogger("mpsd.demo")
COMPLETE_MARKER = "mpsd-demo.json"
MLX_COMPLETE_MARKER = "mpsd-mlx-demo.json"


class DemoBuildFailed(RuntimeError):
    pass


def _demo_dirs(data_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    return {paths.DEMO_MODEL_REF: paths.demo_model_dir(data_dir), paths.MLX_DEMO_MODEL_REF: paths.mlx_demo_model_dir(data_dir)}


def resolve_demo_paths(config: Config, data_dir: pathlib.Path) -> tuple[Config, list[str]]:
    """Replaces '@demo' / '@mlx-demo' with the built models' directories; returns the references used."""
    dirs = _demo_dirs(data_dir)
    used = sorted({m.path for m in config.models if m.path in dirs})
    models = tuple(dataclasses.replace(m, path=str(dirs[m.path])) if m.path in dirs else m for m in config.models)
    return dataclasses.replace(config, models=models), used


def is_built(model_dir: pathlib.Path, marker: str = COMPLETE_MARKER) -> bool:
    return (model_dir / marker).is_file()


async def ensure_demos(refs: list[str], data_dir: pathlib.Path, env: dict[str, str]) -> None:
    """The torch demo first: the MLX demo borrows its tokenizer."""
    if not refs:
        return
    dirs = _demo_dirs(data_dir)
    await ensure_demo_model(dirs[paths.DEMO_MODEL_REF], env)
    if paths.MLX_DEMO_MODEL_REF in refs and not is_built(dirs[paths.MLX_DEMO_MODEL_REF], MLX_COMPLETE_MARKER):
        log.info("building the MLX demo model in %s", dirs[paths.MLX_DEMO_MODEL_REF])
        await _run_builder(["mpsd.worker.mlx_demo_model", str(dirs[paths.MLX_DEMO_MODEL_REF]),
                            "--tokenizer-dir", str(dirs[paths.DEMO_MODEL_REF])], env, "MLX demo")
        if not is_built(dirs[paths.MLX_DEMO_MODEL_REF], MLX_COMPLETE_MARKER):
            raise DemoBuildFailed("building the MLX demo model left no complete model (is mlx-lm installed?)")


async def ensure_demo_model(model_dir: pathlib.Path, env: dict[str, str]) -> None:
    if is_built(model_dir):
        return
    log.info("building the demo model in %s (first use only; about a minute)", model_dir)
    await _run_builder(["mpsd.worker.demo_model", str(model_dir)], env, "demo")
    if not is_built(model_dir):
        raise DemoBuildFailed("building the demo model left no complete model")


async def _run_builder(module_args: list[str], env: dict[str, str], what: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *module_args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    last_lines: list[str] = []
    while line := await process.stdout.readline():
        text = line.decode("utf-8", "replace").rstrip()
        last_lines = (last_lines + [text])[-5:]
        log.info("%s build | %s", what, text)
    if await process.wait() != 0:
        raise DemoBuildFailed(f"building the {what} model failed: " + " / ".join(last_lines))
