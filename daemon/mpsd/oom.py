"""What out-of-memory looks like on each backend and engine: the one signature table.

Shared by the supervisor (classifying a dead worker's stderr, an engine's
included: the engine worker copies its engine's output into its own stderr) and
the worker (recognising an OOM raised inside a request, or an engine's HTTP 500
that says it ran out of memory), so both read text the same way. Each entry is a
regular expression from a real failure; see docs/macos.md, "How out-of-memory
looks", and docs/engines.md.
"""

from __future__ import annotations

import re
from typing import Sequence

OOM_SIGNATURES: tuple[tuple[str, str], ...] = (
    (r"kIOGPUCommandBufferCallbackErrorOutOfMemory", "Metal command buffer ran out of GPU memory"),
    (r"Insufficient Memory", "Metal reported insufficient memory"),
    (r"kIOAccelCommandBufferCallbackErrorSubmissionsIgnored",
     "Metal ignored command buffers after a GPU memory error"),
    (r"ggml_metal_graph_compute: command buffer \d+ failed with status 5",
     "llama.cpp's Metal command buffer failed (status 5: out of GPU memory)"),
    (r"ggml_metal_synchronize: error: command buffer \d+ failed with status 5",
     "llama.cpp's Metal command buffer failed (status 5: out of GPU memory)"),
    (r"\[metal::malloc\]", "MLX could not allocate Metal memory"),
    (r"\[malloc\] Unable to allocate", "MLX could not allocate memory"),
    (r"MPS backend out of memory", "PyTorch MPS ran out of memory"),
    (r"CUDA out of memory", "PyTorch CUDA ran out of memory"),
    (r"torch\.OutOfMemoryError", "PyTorch CUDA ran out of memory"),
    (r"cudaMalloc failed: out of memory", "llama.cpp's CUDA allocation failed"),
)
# Another process's GPU fault took this one down: not this worker's OOM.
NOT_OOM_SIGNATURES = (r"kIOGPUCommandBufferCallbackErrorInnocentVictim",)
# Not an OOM by itself, but a process that crashes after saying it most likely ran out of memory.
OOM_WARNING_SIGNATURES: tuple[tuple[str, str], ...] = (
    (r"current allocated size is greater than the recommended max working set size",
     "llama.cpp had warned it was past Metal's recommended working set"),
)
# An engine's HTTP 500 whose body says this failed the request for memory (ds4-server#890 answers "prefill failed").
HTTP_OOM_SIGNATURES: tuple[tuple[str, str], ...] = OOM_SIGNATURES + (
    (r"prefill failed", "the engine's prefill failed (ds4-server answers so when it runs out of memory)"),
    (r"out of memory", "the engine said it ran out of memory"),
)

_COMPILED = {table: tuple((re.compile(pattern), meaning) for pattern, meaning in table)
             for table in (OOM_SIGNATURES, OOM_WARNING_SIGNATURES, HTTP_OOM_SIGNATURES)}
_NOT_OOM = tuple(re.compile(pattern) for pattern in NOT_OOM_SIGNATURES)


def _first(table: tuple[tuple[str, str], ...], text: str) -> str | None:
    if any(marker.search(text) for marker in _NOT_OOM):
        return None
    return next((meaning for pattern, meaning in _COMPILED[table] if pattern.search(text)), None)


def find_oom_signature(lines: Sequence[str]) -> str | None:
    """The meaning of the first OOM signature found in lines, or None."""
    return _first(OOM_SIGNATURES, "\n".join(lines))


def find_oom_warning(lines: Sequence[str]) -> str | None:
    """The meaning of a warning that memory was short, for a process that then crashed; None if none."""
    return _first(OOM_WARNING_SIGNATURES, "\n".join(lines))


def exception_oom(exc: BaseException) -> str | None:
    """OOM meaning of an exception raised inside a request (torch.OutOfMemoryError included)."""
    return find_oom_signature([f"{type(exc).__module__}.{type(exc).__name__}: {exc}"])


def http_error_oom(status: int, body: str) -> str | None:
    """An engine's answer to one request that means it had no memory for it: a 5xx with an OOM text."""
    if status < 500:
        return None
    return _first(HTTP_OOM_SIGNATURES, body)
