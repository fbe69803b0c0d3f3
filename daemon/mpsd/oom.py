"""What out-of-memory looks like on each backend: the one signature table.

Shared by the supervisor (classifying a dead worker's stderr) and the worker
(recognising an OOM raised inside a request), so both read text the same way.
Substrings come from real failures; see docs/macos.md, "How out-of-memory looks".
"""

from __future__ import annotations

from typing import Sequence

OOM_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("kIOGPUCommandBufferCallbackErrorOutOfMemory", "Metal command buffer ran out of GPU memory"),
    ("Insufficient Memory", "Metal reported insufficient memory"),
    ("[metal::malloc]", "MLX could not allocate Metal memory"),
    ("[malloc] Unable to allocate", "MLX could not allocate memory"),
    ("MPS backend out of memory", "PyTorch MPS ran out of memory"),
    ("CUDA out of memory", "PyTorch CUDA ran out of memory"),
    ("torch.OutOfMemoryError", "PyTorch CUDA ran out of memory"),
)
# Another process's GPU fault took this one down: not this worker's OOM.
NOT_OOM_SIGNATURES = ("kIOGPUCommandBufferCallbackErrorInnocentVictim",)


def find_oom_signature(lines: Sequence[str]) -> str | None:
    """The meaning of the first OOM signature found in lines, or None."""
    text = "\n".join(lines)
    if any(marker in text for marker in NOT_OOM_SIGNATURES):
        return None
    for substring, meaning in OOM_SIGNATURES:
        if substring in text:
            return meaning
    return None


def exception_oom(exc: BaseException) -> str | None:
    """OOM meaning of an exception raised inside a request (torch.OutOfMemoryError included)."""
    return find_oom_signature([f"{type(exc).__module__}.{type(exc).__name__}: {exc}"])
