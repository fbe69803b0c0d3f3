"""What a torch backend can say about its device memory.

On CPU torch keeps no separate accounting, so the report says so instead of
inventing a number; the process footprint (measured by the daemon) covers it.
"""

from __future__ import annotations

from mpsd.backend_memory import (
    CUDA_ALLOCATED, CUDA_MAX_RESERVED, CUDA_RESERVED, MPS_CURRENT_ALLOCATED, MPS_DRIVER_ALLOCATED, MPS_RECOMMENDED_MAX,
)
from mpsd.worker.backends.base import MemoryReport


def torch_memory_report(torch, device: str) -> MemoryReport:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return MemoryReport({
            CUDA_ALLOCATED: int(torch.cuda.memory_allocated(index)),
            CUDA_RESERVED: int(torch.cuda.memory_reserved(index)),
            CUDA_MAX_RESERVED: int(torch.cuda.max_memory_reserved(index)),
        })
    if device == "mps":
        return MemoryReport({
            MPS_CURRENT_ALLOCATED: int(torch.mps.current_allocated_memory()),
            MPS_DRIVER_ALLOCATED: int(torch.mps.driver_allocated_memory()),
            MPS_RECOMMENDED_MAX: int(torch.mps.recommended_max_memory()),
        })
    return MemoryReport({}, note="torch on cpu keeps no device accounting; see the process footprint")
