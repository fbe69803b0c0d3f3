"""Every backend a worker can run, described as plain data: the one list config and worker share.

Each loader is a "module:attr" string (uvicorn style) imported only inside the
worker, so the daemon can validate a config without importing torch or mlx.
A loader is called as `load(spec, log)` with the worker's WorkerSpec and a
one-line logger, and returns the model.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Callable


# Language models decode many sequences per step of one resident model: measured on 2 CPU cores, 16 streams on one
# demo worker gave ~3.5x one stream's tokens/s (docs/performance.md); Apple GPUs gain more.
BATCHED_CONCURRENCY = 16
# An engine batches by itself, as many as it was told to (llama-server --parallel, mlx_lm.server's batch): docs/engines.md.
ENGINE_CONCURRENCY = 8


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    loader: str
    generates: bool               # a language model serving Generate, not tensors through Predict
    needs_path: bool = False      # a model directory
    needs_factory: bool = False   # a 'package.module:function' returning a torch.nn.Module
    takes_mlx_limits: bool = False
    uses_torch_device: bool = False  # the worker picks a torch device and pins torch threads first
    default_concurrency: int = 1  # sequences one worker decodes together (language models batch)
    keeps_prefix_cache: bool = False  # KV of earlier prompts kept for the next turn (prefix_cache, on by default)
    runs_engine: bool = False     # an external server does the decoding: no decode loop in the worker

    def load_function(self) -> Callable:
        """Imports the loader: call it only in a worker, since it may import torch or mlx."""
        module_name, _, attr = self.loader.partition(":")
        return getattr(importlib.import_module(module_name), attr)


BACKENDS: types.MappingProxyType[str, Backend] = types.MappingProxyType({backend.name: backend for backend in (
    Backend("torch-lm", "mpsd.worker.backends.torch_lm:load", generates=True, needs_path=True, uses_torch_device=True,
            default_concurrency=BATCHED_CONCURRENCY, keeps_prefix_cache=True),
    Backend("torch-module", "mpsd.worker.backends.torch_module:load", generates=False, needs_factory=True,
            uses_torch_device=True),
    Backend("mlx-lm", "mpsd.worker.backends.mlx_lm:load", generates=True, needs_path=True, takes_mlx_limits=True,
            default_concurrency=BATCHED_CONCURRENCY, keeps_prefix_cache=True),
    Backend("engine", "mpsd.worker.engine.backend:load", generates=True, default_concurrency=ENGINE_CONCURRENCY,
            runs_engine=True),
    Backend("null-lm", "mpsd.worker.backends.null_lm:load", generates=True,  # no framework: measures mpsd itself
            default_concurrency=BATCHED_CONCURRENCY),
)})
