"""A [[models]] table: name, backend and where the model comes from, demand bounds, MLX limits."""

from __future__ import annotations

import pathlib
import re
from typing import Any

from mpsd import paths
from mpsd.backends import BACKENDS
from mpsd.config.engines import BOOT_ALLOWANCE_S, ENGINE_KEYS, is_gguf, read_engine
from mpsd.config.reader import Reader
from mpsd.config.schema import DEVICE_PATTERN, FACTORY_PATTERN, NAME_PATTERN, ModelConfig
from mpsd.units import parse_size

_MODEL_KEYS = (
    "name", "backend", "path", "factory", "replicas", "device", "devices", "concurrency", "threads",
    "footprint", "env", "queue", "load_timeout", "memory_limit", "wired_limit", "cache_limit",
    "min_replicas", "max_replicas", "keep_alive", "priority", "scale_up_queue", "prefix_cache", "routing",
    "max_batch_size", "max_batch_delay",
    *ENGINE_KEYS,
)
ROUTING_POLICIES = ("prefix", "least-loaded")
DEFAULT_PREFIX_CACHE_FRACTION = 0.25  # of the worker's footprint (weights + a full batch's KV): docs/configuration.md
DEFAULT_BATCH_DELAY_S = 0.0  # max_batch_delay: a batch is what waited while the module ran; configuration.md says why
BATCHES_IN_FLIGHT = 2  # concurrency's default when batching, in batches: one runs while the next gathers


def read_model(reader: Reader, table: dict[str, Any], index: int, base_dir: pathlib.Path) -> ModelConfig:
    at = f"models[{index}]."
    reader.only_keys(table, at, _MODEL_KEYS)
    name = reader.string(table, "name", at + "name")
    if not name or not NAME_PATTERN.match(name):
        raise reader.fail(at + "name", f"must be 1-63 letters, digits, '.', '_' or '-', got {name!r}")
    at = f"models[{index}] ({name})."
    backend = reader.string(table, "backend", at + "backend")
    gguf = is_gguf(backend, reader.string(table, "path", at + "path"))
    if gguf:
        backend = "engine"  # a GGUF file with no backend: llama.cpp serves it (config/engines.py)
    if backend not in BACKENDS:
        raise reader.fail(at + "backend", f"must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = reader.string(table, "device", at + "device", "auto")
    if not DEVICE_PATTERN.match(device):
        raise reader.fail(at + "device", f"must be auto, cpu, mps, cuda or cuda:N, got {device!r}")
    path = _model_path(reader, table, at, backend, base_dir)
    engine = read_engine(reader, table, at, backend, gguf=gguf, has_path=path is not None)
    default_concurrency = (engine and engine.concurrency) or BACKENDS[backend].default_concurrency
    return ModelConfig(
        name=name,
        backend=backend,
        path=path,
        factory=_model_factory(reader, table, at, backend),
        **_demand(reader, table, at),
        device=device,
        devices=_devices(reader, table, at, device),
        **_concurrency_and_batching(reader, table, at, backend, default_concurrency),
        threads=reader.integer(table, "threads", at + "threads", 0, 0),
        footprint_bytes=reader.size(table, "footprint", at + "footprint"),
        env=_model_env(reader, table, at),
        queue_limit=reader.integer(table, "queue", at + "queue", 64, 0),
        load_timeout_s=_load_timeout(reader, table, at, engine),
        **_mlx_limits(reader, table, at, backend),
        **_prefix_cache(reader, table, at, backend),
        routing=_routing_policy(reader, table, at),
        engine=engine,
    )


def _devices(reader: Reader, table: dict[str, Any], at: str, device: str) -> tuple[str, ...]:
    """devices = ["cuda:0", "cuda:1"]: the GPUs mpsd may place this model's replicas on (docs/multi-gpu.md)."""
    if "devices" not in table:
        return ()
    listed = table["devices"]
    if not isinstance(listed, list) or not listed or not all(isinstance(d, str) for d in listed):
        raise reader.fail(at + "devices", f'must be a non-empty list of GPUs like ["cuda:0", "cuda:1"], got {listed!r}')
    if device not in ("cuda", "auto"):
        raise reader.fail(at + "devices", f"chooses among GPUs for device \"cuda\" or \"auto\"; device is {device!r}"
                                          " (a pinned device needs no list)")
    for name in listed:
        if not re.match(r"^cuda:[0-9]+$", name):
            raise reader.fail(at + "devices", f"each must be a GPU like \"cuda:1\", got {name!r}")
    if len(set(listed)) != len(listed):
        raise reader.fail(at + "devices", f"lists a GPU twice: {listed!r}")
    return tuple(listed)


def _concurrency_and_batching(reader: Reader, table: dict[str, Any], at: str, backend: str,
                              default_concurrency: int) -> dict[str, Any]:
    """concurrency, and a Predict model's max_batch_size and max_batch_delay (worker/predict_batcher.py).

    The daemon sends a worker at most `concurrency` requests at once, so a batch needs at least max_batch_size of
    them; by default it may send two batches' worth, so the next batch gathers while one runs.
    """
    for key in ("max_batch_size", "max_batch_delay"):
        if key in table and BACKENDS[backend].generates:
            takers = ", ".join(b.name for b in BACKENDS.values() if not b.generates)
            raise reader.fail(at + key, f"applies to backend {takers} only (Predict); language models batch up to "
                                        "their concurrency by themselves")
    size = reader.integer(table, "max_batch_size", at + "max_batch_size", 1, 1)
    delay = reader.duration(table, "max_batch_delay", at + "max_batch_delay", DEFAULT_BATCH_DELAY_S)
    if size > 1:
        default_concurrency = max(default_concurrency, BATCHES_IN_FLIGHT * size)
    concurrency = reader.integer(table, "concurrency", at + "concurrency", default_concurrency, 1)
    if concurrency < size:
        raise reader.fail(at + "max_batch_size", f"{size} is above concurrency {concurrency}: a worker is sent at "
                                                 "most concurrency requests at once, so no batch could fill")
    return dict(concurrency=concurrency, max_batch_size=size, max_batch_delay_s=delay)


def _load_timeout(reader: Reader, table: dict[str, Any], at: str, engine) -> float:
    """An engine's start_timeout is the worker's wait for its health; load_timeout, the daemon's for the worker,
    covers it and the worker's own start, so by default it is start_timeout plus that allowance."""
    if engine is None:
        return reader.duration(table, "load_timeout", at + "load_timeout", 300.0)
    timeout = reader.duration(table, "load_timeout", at + "load_timeout", engine.start_timeout_s + BOOT_ALLOWANCE_S)
    if timeout < engine.start_timeout_s:
        raise reader.fail(at + "load_timeout", f"{timeout:g}s is below start_timeout {engine.start_timeout_s:g}s:"
                                              " the daemon would kill the worker while it still waits for its engine")
    return timeout


def _prefix_cache(reader: Reader, table: dict[str, Any], at: str, backend: str) -> dict[str, Any]:
    """prefix_cache: "1GiB" (a size), "25%" or 0.25 (a fraction of the worker's own measured footprint), "0": off."""
    keeps = BACKENDS[backend].keeps_prefix_cache
    if "prefix_cache" not in table:
        return dict(prefix_cache_fraction=DEFAULT_PREFIX_CACHE_FRACTION if keeps else None)
    try:
        size, fraction = parse_cache_budget(table["prefix_cache"])
    except ValueError as exc:
        raise reader.fail(at + "prefix_cache", str(exc)) from None
    if not keeps and (size or fraction):
        takers = ", ".join(b.name for b in BACKENDS.values() if b.keeps_prefix_cache)
        raise reader.fail(at + "prefix_cache", f"applies to backend {takers} only (or '0')")
    return dict(prefix_cache_bytes=size or None, prefix_cache_fraction=fraction)


def parse_cache_budget(value: Any) -> tuple[int, float | None]:
    """(bytes, None) for a size, (0, fraction) for a fraction; ValueError naming the accepted forms."""
    forms = "a size like '1GiB', a fraction of the worker's footprint like '25%' or 0.25, or '0' for off"
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            percent = float(value.strip()[:-1])
        except ValueError:
            raise ValueError(f"expected {forms}, got {value!r}") from None
        if not 0.0 <= percent <= 100.0:
            raise ValueError(f"a percentage must be from 0% to 100%, got {value!r}")
        return 0, (percent / 100.0 or None)
    if isinstance(value, float):  # a number with a point is a fraction: 1.0 as one byte would surprise everyone
        if 0.0 < value < 1.0:
            return 0, value
        if value == 0.0:
            return 0, None
        raise ValueError(f"a fraction must be between 0 and 1 (a size is '1GiB' or whole bytes), got {value!r}")
    try:
        return parse_size(value), None
    except ValueError:
        raise ValueError(f"expected {forms}, got {value!r}") from None


def _routing_policy(reader: Reader, table: dict[str, Any], at: str) -> str:
    policy = reader.string(table, "routing", at + "routing", "prefix")
    if policy not in ROUTING_POLICIES:
        raise reader.fail(at + "routing", f"must be one of {', '.join(ROUTING_POLICIES)}, got {policy!r}")
    return policy


def _demand(reader: Reader, table: dict[str, Any], at: str) -> dict[str, Any]:
    """replicas is the count at start; min/max bound what demand may do. Each refusal names the key."""
    given_min = "min_replicas" in table
    minimum = reader.integer(table, "min_replicas", at + "min_replicas", 1, 0) if given_min else None
    replicas = reader.integer(table, "replicas", at + "replicas", 1 if minimum is None else minimum, 0)
    minimum = replicas if minimum is None else minimum
    # A demand-driven model (min_replicas given) may load on request: at least one worker unless max says 0.
    maximum = reader.integer(table, "max_replicas", at + "max_replicas", max(replicas, minimum, int(given_min)), 0)
    if given_min and minimum > maximum:
        raise reader.fail(at + "min_replicas", f"{minimum} is above max_replicas {maximum}")
    if replicas > maximum:
        raise reader.fail(at + "replicas", f"{replicas} is above max_replicas {maximum}")
    if replicas < minimum:
        raise reader.fail(at + "replicas", f"{replicas} is below min_replicas {minimum}")
    return dict(replicas=replicas, min_replicas=minimum, max_replicas=maximum,
                keep_alive_s=_keep_alive(reader, table, at), priority=reader.integer(
                    table, "priority", at + "priority", 0, -(1 << 31)),
                scale_up_queue=reader.integer(table, "scale_up_queue", at + "scale_up_queue", 1, 1))


def _keep_alive(reader: Reader, table: dict[str, Any], at: str) -> float | None:
    value = table.get("keep_alive", "5m")
    if value in (-1, "-1"):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise reader.fail(at + "keep_alive", f"must be a duration like '5m', or -1 for never, got {value!r}")
    return reader.duration(table, "keep_alive", at + "keep_alive", 300.0)


def _mlx_limits(reader: Reader, table: dict[str, Any], at: str, backend: str) -> dict[str, int | None]:
    """Per-worker MLX limits, so several workers can share one Metal budget."""
    limits = {f"{key}_bytes": reader.size(table, key, at + key) for key in ("memory_limit", "wired_limit", "cache_limit")}
    if not BACKENDS[backend].takes_mlx_limits and any(v is not None for v in limits.values()):
        takers = ", ".join(b.name for b in BACKENDS.values() if b.takes_mlx_limits)
        raise reader.fail(at + "memory_limit", f"memory_limit, wired_limit and cache_limit apply to backend {takers} only")
    return limits


def _model_path(reader: Reader, table: dict[str, Any], at: str, backend: str, base_dir: pathlib.Path) -> str | None:
    path = reader.string(table, "path", at + "path")
    if BACKENDS[backend].needs_path and not path:
        raise reader.fail(at + "path", f"backend {backend} needs the model directory ('@demo' or '@mlx-demo' for the demo models)")
    if path is None or path in paths.DEMO_MODEL_REFS:
        return path
    return str(base_dir / pathlib.Path(path).expanduser())


def _model_factory(reader: Reader, table: dict[str, Any], at: str, backend: str) -> str | None:
    factory = reader.string(table, "factory", at + "factory")
    if BACKENDS[backend].needs_factory and not factory:
        raise reader.fail(at + "factory", f"backend {backend} needs factory = 'package.module:function'")
    if factory and not FACTORY_PATTERN.match(factory):
        raise reader.fail(at + "factory", f"must look like 'package.module:function', got {factory!r}")
    return factory


def _model_env(reader: Reader, table: dict[str, Any], at: str) -> dict[str, str]:
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise reader.fail(at + "env", "must be a table of string values, e.g. env = { OMP_PROC_BIND = 'true' }")
    return dict(env)
