"""Device choice and thread counts, decided inside the worker process.

The daemon never initializes a GPU runtime; each worker picks its own device
so a Metal or CUDA context exists only in the process that uses it.
"""

from __future__ import annotations

import os


def pick_torch_device(configured: str) -> str:
    import torch

    if configured != "auto":
        _check_available(torch, configured)
        return configured
    if torch.backends.mps.is_available():
        return "mps"
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _check_available(torch, device: str) -> None:
    from mpsd.worker.backends.base import BootFailure

    if device == "mps" and not torch.backends.mps.is_available():
        raise BootFailure("device 'mps' was configured but this machine has no usable MPS device")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BootFailure(f"device {device!r} was configured but torch sees no CUDA device")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise BootFailure(f"device {device!r} was configured but torch sees {torch.cuda.device_count()} CUDA devices")


def set_torch_threads(threads: int) -> int:
    """Pins intra-op threads so several workers on one machine do not oversubscribe cores."""
    import torch

    count = threads if threads > 0 else max(1, os.cpu_count() or 1)
    torch.set_num_threads(count)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set once in this process; the first value stays
    return count
