"""Names of the memory figures a worker backend reports, shared by worker and daemon.

The worker writes them into WorkerStats.backend_memory and the daemon reads
some back to learn footprints; one definition keeps a renamed figure from
silently dropping out of admission.
"""

CUDA_ALLOCATED = "cuda_allocated"
CUDA_RESERVED = "cuda_reserved"
CUDA_MAX_RESERVED = "cuda_max_reserved"
MPS_CURRENT_ALLOCATED = "mps_current_allocated"
MPS_DRIVER_ALLOCATED = "mps_driver_allocated"
MPS_RECOMMENDED_MAX = "mps_recommended_max"
MLX_ACTIVE = "mlx_active"
MLX_PEAK = "mlx_peak"
MLX_CACHE = "mlx_cache"
MLX_MAX_RECOMMENDED_WORKING_SET = "mlx_max_recommended_working_set"
MLX_MEMORY_SIZE = "mlx_memory_size"

# What a worker wired on its device at most: the footprint admission learns from.
DEVICE_PEAK_KEYS = (CUDA_MAX_RESERVED, MPS_DRIVER_ALLOCATED, MLX_PEAK)
# Metal's recommended working set, which only a process holding the device can read.
WORKING_SET_KEYS = (MPS_RECOMMENDED_MAX, MLX_MAX_RECOMMENDED_WORKING_SET)
