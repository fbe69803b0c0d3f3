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


class DemoBuildFailed(RuntimeError):
    pass


def resolve_demo_paths(config: Config, data_dir: pathlib.Path) -> tuple[Config, pathlib.Path | None]:
    """Replaces '@demo' with the built model's directory; returns that directory if any model uses it."""
    demo_dir = paths.demo_model_dir(data_dir)
    used = any(m.path == paths.DEMO_MODEL_REF for m in config.models)
    models = tuple(
        dataclasses.replace(m, path=str(demo_dir)) if m.path == paths.DEMO_MODEL_REF else m for m in config.models
    )
    return dataclasses.replace(config, models=models), (demo_dir if used else None)


def is_built(model_dir: pathlib.Path) -> bool:
    return (model_dir / COMPLETE_MARKER).is_file()


async def ensure_demo_model(model_dir: pathlib.Path, env: dict[str, str]) -> None:
    if is_built(model_dir):
        return
    log.info("building the demo model in %s (first use only; about a minute)", model_dir)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mpsd.worker.demo_model", str(model_dir),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    last_lines: list[str] = []
    while line := await process.stdout.readline():
        text = line.decode("utf-8", "replace").rstrip()
        last_lines = (last_lines + [text])[-5:]
        log.info("demo build | %s", text)
    if await process.wait() != 0 or not is_built(model_dir):
        raise DemoBuildFailed("building the demo model failed: " + " / ".join(last_lines))
