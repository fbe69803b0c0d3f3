"""Worker entry point: `python -m mpsd.worker --spec JSON`, started by exec from mpsd.

Order matters: watch the parent first (an orphan must never hold GPU
memory), then pick the device and threads, load the model, start the decode
loop (language models) and warm up through it, and only then open the socket,
so "the socket answers" means "ready to serve".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
import traceback

from mpsd.backends import BACKENDS
from mpsd.exitcodes import EXIT_BOOT_FAILURE
from mpsd.worker.backends.base import BootFailure
from mpsd.worker_spec import WorkerSpec, spec_help


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        spec = WorkerSpec.from_json(args.spec)
    except ValueError as exc:
        _log(f"boot failure: bad --spec: {exc}")
        return EXIT_BOOT_FAILURE
    from mpsd.worker import watchdog

    watchdog.start(spec.parent_pid)
    try:
        model = _load(spec)
        scheduler = _start_decoding(spec, model)
    except Exception as exc:  # anything that stops the model loading is a boot failure
        _report_boot_failure(exc)
        return EXIT_BOOT_FAILURE
    try:
        return _serve(spec, model, scheduler)
    finally:
        if scheduler is not None:
            scheduler.stop()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mpsd.worker", description="an mpsd worker (started by mpsd)")
    parser.add_argument("--spec", required=True, help=spec_help())
    return parser.parse_args(argv)


def _load(spec: WorkerSpec):
    """Imports the chosen backend's code only: an mlx worker must never load mpsd's torch code
    (transformers may still import torch if installed), so torch device setup runs for torch backends alone."""
    backend = BACKENDS.get(spec.backend)
    if backend is None:
        raise BootFailure(f"unknown backend {spec.backend!r} (known: {', '.join(BACKENDS)})")
    if backend.uses_torch_device:
        spec = _on_torch_device(spec)
    return backend.load_function()(spec, _log)


def _on_torch_device(spec: WorkerSpec) -> WorkerSpec:
    """The spec with the device and thread count this process got, so loaders never see 'auto' or 0."""
    from mpsd.worker.device import pick_torch_device, set_torch_threads

    threads = set_torch_threads(spec.threads)
    device = pick_torch_device(spec.device)
    _log(f"loading {spec.backend} model on {device} with {threads} threads")
    return dataclasses.replace(spec, device=device, threads=threads)


def _start_decoding(spec: WorkerSpec, model):
    """Language models decode on one scheduler thread; a short greedy run through it warms everything up,
    so the first client does not pay for lazy init. Tensor models warm up by themselves."""
    if not BACKENDS[spec.backend].generates:
        model.warm_up()
        return None
    if BACKENDS[spec.backend].runs_engine:
        return model  # the engine batches by itself and answered its health path: it stands for the decode loop
    from mpsd.generate_params import GenerateParams
    from mpsd.worker.scheduler import DecodeScheduler

    scheduler = DecodeScheduler(model, spec.concurrency)
    scheduler.start()
    for _ in scheduler.submit(GenerateParams(prompt="Hello", max_tokens=4, temperature=0.0, top_p=1.0, seed=0, stop=())):
        pass
    _configure_prefix_cache(spec, model, scheduler)
    return scheduler


def _configure_prefix_cache(spec: WorkerSpec, model, scheduler) -> None:
    """After the warm-up, so its prompt is not kept. A fraction is of this worker's own footprint: its weights as
    measured at load plus the KV a full batch holds (kv_reserve_bytes), what admission counts it by."""
    from mpsd.units import format_bytes
    from mpsd.worker.prefix_store import resolve_budget

    if getattr(model, "prefix_cache", None) is None:
        return
    footprint = getattr(model, "weights_bytes", 0) + scheduler.kv_reserve_bytes
    budget = resolve_budget(spec.prefix_cache_bytes, spec.prefix_cache_fraction, footprint)
    scheduler.configure_prefix_cache(budget)
    _log(f"prefix cache: {format_bytes(budget) if budget else 'off'}")


def _report_boot_failure(exc: BaseException) -> None:
    if not isinstance(exc, BootFailure):
        traceback.print_exc(file=sys.stderr)
    _log(f"boot failure: {type(exc).__name__}: {exc}")


def _serve(spec: WorkerSpec, model, scheduler) -> int:
    import grpc

    from mpsd.v1 import worker_pb2_grpc
    from mpsd.worker import step_socket
    from mpsd.worker.server import WorkerService

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=spec.concurrency + 4)
    server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
    service = WorkerService(spec.worker_id, spec.backend, model, scheduler, spec.model, spec.max_batch_size,
                            spec.max_batch_delay_s, placed_device=spec.placed_device)
    worker_pb2_grpc.add_WorkerServicer_to_server(service, server)
    socket_path = spec.socket
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server.add_insecure_port(f"unix:{socket_path}")
    steps = step_socket.listen(spec.steps_socket, service.serve_steps) if scheduler is not None else None
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    _log(f"ready on {socket_path}")
    stopping.wait()
    _log("stopping: finishing in-flight requests")
    started = time.monotonic()
    if steps is not None:
        steps.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spec.steps_socket)
    service.finish_streams(spec.stop_grace_s)
    server.stop(grace=max(0.0, spec.stop_grace_s - (time.monotonic() - started))).wait()
    service.stop_batching()
    return 0


def _log(message: str) -> None:
    sys.stderr.write(f"mpsd worker {os.getpid()}: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
