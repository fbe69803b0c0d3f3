"""Worker entry point: `python -m mpsd.worker --spec JSON`, started by exec from mpsd.

Order matters: watch the parent first (an orphan must never hold GPU
memory), then pick the device and threads, load and warm the model, and only
then open the socket, so "the socket answers" means "ready to serve".
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
import traceback

from mpsd.exitcodes import EXIT_BOOT_FAILURE


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    spec = json.loads(args.spec)
    from mpsd.worker import watchdog

    watchdog.start(spec["parent_pid"])
    try:
        model = _load(spec)
        model.warm_up()
    except Exception as exc:  # anything that stops the model loading is a boot failure
        _report_boot_failure(exc)
        return EXIT_BOOT_FAILURE
    return _serve(spec, model)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mpsd.worker", description="an mpsd worker (started by mpsd)")
    parser.add_argument("--spec", required=True, help="JSON: worker_id, socket, backend, path, factory, device, threads, parent_pid")
    return parser.parse_args(argv)


def _load(spec: dict):
    if spec["backend"] == "null-lm":  # no framework at all: measures mpsd itself
        from mpsd.worker.backends.null_lm import NullLM

        return NullLM()
    if spec["backend"] == "mlx-lm":  # before mpsd's torch code (transformers may still import torch if installed)
        from mpsd.worker.backends.mlx_lm import MlxCausalLM

        _log(f"loading mlx-lm model from {spec['path']}")
        model = MlxCausalLM(
            spec["path"],
            memory_limit_bytes=spec.get("mlx_memory_limit"),
            wired_limit_bytes=spec.get("mlx_wired_limit"),
            cache_limit_bytes=spec.get("mlx_cache_limit"),
        )
        _log(f"mlx-lm model on {model.device}, limits set (previous values: {model.limits_before})")
        return model
    from mpsd.worker.device import pick_torch_device, set_torch_threads

    threads = set_torch_threads(spec.get("threads", 0))
    device = pick_torch_device(spec.get("device", "auto"))
    _log(f"loading {spec['backend']} model on {device} with {threads} threads")
    if spec["backend"] == "torch-lm":
        from mpsd.worker.backends.torch_lm import TorchCausalLM

        return TorchCausalLM(spec["path"], device)
    if spec["backend"] == "torch-module":
        from mpsd.worker.backends.torch_module import TorchModule

        return TorchModule(spec["factory"], device)
    from mpsd.worker.backends.base import BootFailure

    raise BootFailure(f"unknown backend {spec['backend']!r}")


def _report_boot_failure(exc: BaseException) -> None:
    from mpsd.worker.backends.base import BootFailure

    if not isinstance(exc, BootFailure):
        traceback.print_exc(file=sys.stderr)
    _log(f"boot failure: {type(exc).__name__}: {exc}")


def _serve(spec: dict, model) -> int:
    import grpc

    from mpsd.v1 import worker_pb2_grpc
    from mpsd.worker.server import WorkerService

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=spec.get("concurrency", 1) + 4)
    server = grpc.server(executor, options=[("grpc.so_reuseport", 0)])
    worker_pb2_grpc.add_WorkerServicer_to_server(WorkerService(spec["worker_id"], spec["backend"], model), server)
    socket_path = spec["socket"]
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server.add_insecure_port(f"unix:{socket_path}")
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    server.start()
    _log(f"ready on {socket_path}")
    stopping.wait()
    _log("stopping: finishing in-flight requests")
    server.stop(grace=spec.get("stop_grace_s", 5.0)).wait()
    return 0


def _log(message: str) -> None:
    sys.stderr.write(f"mpsd worker {os.getpid()}: {message}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
