"""A plain torch nn.Module from `package.module:factory`, served through Predict.

The factory is imported inside the worker only, so a user's module (and its
import errors) can never reach the daemon.
"""

from __future__ import annotations

import importlib
from typing import Callable

from mpsd.oom import exception_oom
from mpsd.worker.backends.base import BootFailure, InvalidRequest, MemoryReport
from mpsd.worker.backends.memory import torch_memory_report
from mpsd.worker_spec import WorkerSpec


def import_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BootFailure(f"factory {spec!r}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise BootFailure(f"factory {spec!r}: {module_name} has no callable {attr!r}")
    return factory


class TorchModule:
    def __init__(self, factory_spec: str, device: str) -> None:
        import torch

        self._torch = torch
        self.device = device
        factory = import_factory(factory_spec)
        try:
            module = factory()
        except Exception as exc:  # a user's factory may raise anything; it is a boot failure
            raise BootFailure(f"factory {factory_spec!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, torch.nn.Module):
            raise BootFailure(f"factory {factory_spec!r} returned {type(module).__name__}, not a torch.nn.Module")
        self._module = module.to(device).eval()

    def warm_up(self) -> None:
        """Nothing generic to run: input shapes are the user's; the first request pays for lazy init."""

    def memory_report(self) -> MemoryReport:
        return torch_memory_report(self._torch, self.device)

    def predict(self, inputs: dict) -> dict:
        """inputs: name -> numpy array. Calls module(**inputs); returns name -> numpy array."""
        torch = self._torch
        tensors = {name: torch.from_numpy(array.copy()).to(self.device) for name, array in inputs.items()}
        with torch.inference_mode():
            try:
                result = self._module(**tensors)
            except (TypeError, RuntimeError, ValueError) as exc:
                if exception_oom(exc):
                    raise  # not the input's fault: the worker server answers RESOURCE_EXHAUSTED
                raise InvalidRequest(f"inputs: the model rejected them: {exc}") from exc
        return {name: value.detach().cpu().numpy() for name, value in _named_outputs(result).items()}


def load(spec: WorkerSpec, log: Callable[[str], None]) -> TorchModule:
    """spec.device is the device the worker picked, never 'auto'."""
    return TorchModule(spec.factory, spec.device)


def _named_outputs(result) -> dict:
    if isinstance(result, dict):
        return result
    if isinstance(result, (tuple, list)):
        return {f"output_{i}": value for i, value in enumerate(result)}
    return {"output": result}
