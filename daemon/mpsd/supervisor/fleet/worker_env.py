"""What a worker process is launched with: its spec, its share of the cores and its environment."""

from __future__ import annotations

import os
import pathlib

import mpsd
from mpsd.config import ModelConfig
from mpsd.paths import ensure_private_dir
from mpsd.worker_spec import WorkerSpec

PACKAGE_PARENT = str(pathlib.Path(mpsd.__file__).resolve().parent.parent)


def default_threads(model: ModelConfig, models: tuple[ModelConfig, ...], cpu_count: int) -> int:
    """Splits the cores among all workers, keeping one for the daemon and clients when there are spare.

    Measured here (benchmarks/): one demo worker with 2 torch threads on 2 cores
    streamed 285 tokens/s, with 1 thread 806 — intra-op threads spin against the
    daemon's and the client's per-token work, so oversubscription costs more than
    the second core gives.
    """
    if model.threads:
        return model.threads
    total = sum(m.replicas for m in models) or 1
    spare = cpu_count - 1 if cpu_count > total else cpu_count
    return max(1, spare // total)


def worker_env(model: ModelConfig) -> dict[str, str]:
    """The daemon's environment (PYTHONPATH included), the model's env, and thread caps."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    if model.threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(model.threads))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # progress bars make unreadable log lines
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")
    env.update(model.env)
    return env


def visible_gpu(model: ModelConfig, placed: str) -> str | None:
    """The GPU index a worker placed on `placed` is to see alone, or None to leave CUDA's view as it is: for a
    model whose device lets mpsd choose (cuda, auto) or names that GPU, unless its env sets the view itself."""
    if not placed.startswith("cuda:") or "CUDA_VISIBLE_DEVICES" in model.env:
        return None
    return placed[5:] if model.device in ("cuda", "auto", placed) else None


def device_env(model: ModelConfig, placed: str) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for a worker placed on one GPU, so no process it runs opens a context on another; in
    NVML's (PCI bus) order, which is how the probe and placement number GPUs."""
    index = visible_gpu(model, placed)
    return {} if index is None else {"CUDA_VISIBLE_DEVICES": index, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def worker_spec(worker_id: str, model: ModelConfig, socket: pathlib.Path, stop_grace_s: float,
                placed: str = "") -> WorkerSpec:
    """What the worker is to be; its socket sits in the private run directory. A worker that sees one GPU alone
    calls it "cuda" (it is index 0 in its process), whichever GPU that is."""
    device = "cuda" if visible_gpu(model, placed) is not None and model.device.startswith("cuda") else model.device
    return WorkerSpec(
        worker_id=worker_id, model=model.name, socket=str(socket), backend=model.backend, parent_pid=os.getpid(),
        path=model.path, factory=model.factory, device=device, placed_device=placed, threads=model.threads,
        concurrency=model.concurrency, stop_grace_s=stop_grace_s, mlx_memory_limit=model.memory_limit_bytes,
        max_batch_size=model.max_batch_size, max_batch_delay_s=model.max_batch_delay_s,
        mlx_wired_limit=model.wired_limit_bytes, mlx_cache_limit=model.cache_limit_bytes,
        prefix_cache_bytes=model.prefix_cache_bytes, prefix_cache_fraction=model.prefix_cache_fraction,
        replica=int(worker_id.rpartition("-")[2] or 0), **_engine_spec(worker_id, model, socket.parent.parent),
    )


def _engine_spec(worker_id: str, model: ModelConfig, state_dir: pathlib.Path) -> dict:
    """An engine worker's command and its {state}: STATE_DIR/engines/WORKER_ID, private, kept across restarts."""
    engine = model.engine
    if engine is None:
        return {}
    state = ensure_private_dir(state_dir / "engines" / worker_id)
    return dict(engine_command=list(engine.command), engine_health=engine.health,
                engine_start_timeout_s=engine.start_timeout_s, engine_state_dir=str(state))
