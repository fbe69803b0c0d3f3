"""What a torch backend can say about its device memory.

On CPU torch keeps no separate accounting, so the report says so instead of
inventing a number; the process footprint (measured by the daemon) covers it.
"""

from __future__ import annotations

from mpsd.worker.backends.base import MemoryReport


def torch_memory_report(torch, device: str) -> MemoryReport:
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        return MemoryReport({
            "cuda_allocated": int(torch.cuda.memory_allocated(index)),
            "cuda_reserved": int(torch.cuda.memory_reserved(index)),
            "cuda_max_reserved": int(torch.cuda.max_memory_reserved(index)),
        })
    if device == "mps":
        return MemoryReport({
            "mps_current_allocated": int(torch.mps.current_allocated_memory()),
            "mps_driver_allocated": int(torch.mps.driver_allocated_memory()),
            "mps_recommended_max": int(torch.mps.recommended_max_memory()),
        })
    return MemoryReport({}, note="torch on cpu keeps no device accounting; see the process footprint")
