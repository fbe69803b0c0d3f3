"""NVIDIA GPUs' memory from the driver (NVML): no CUDA context, so the daemon never holds a GPU.

One probe reads one GPU (`nvml:N`) or every GPU the driver lists (`nvml`,
and `auto` on a machine where NVML answers), each reported as the device a
worker's config names ("cuda:N", NVML's index, which is the PCI bus order
workers are given through CUDA_DEVICE_ORDER=PCI_BUS_ID). Utilization and
temperature come with memory where the driver gives them.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from mpsd.supervisor.memory.snapshot import MemorySnapshot, ProbeError


def _import_pynvml() -> ModuleType:
    """Imported only here: the package is optional and absent on Macs."""
    import pynvml  # noqa: PLC0415  (optional dependency: nvidia-ml-py)

    return pynvml


def nvml_available(nvml: Any = None) -> bool:
    """Whether NVML answers and sees a GPU; any failure (no package, no
    driver, no device) means no, because "auto" must then fall back."""
    try:
        nvml = nvml or _import_pynvml()
        nvml.nvmlInit()
    except Exception:  # noqa: BLE001  (ImportError, NVMLError, OSError from ctypes)
        return False
    try:
        return nvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001
        return False
    finally:
        _quiet_shutdown(nvml)


def _quiet_shutdown(nvml: Any) -> None:
    try:
        nvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  (shutdown failing changes nothing we report)
        pass


def _text(value: bytes | str) -> str:
    """Older pynvml releases return device names as bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class NvmlMemoryProbe:
    """Device memory of one NVIDIA GPU (device_index) or of all of them (None)."""

    def __init__(self, device_index: int | None = None, nvml: Any = None) -> None:
        self.device_index = device_index
        self.name = "nvml" if device_index is None else f"nvml:{device_index}"
        self._nvml = nvml
        self._handles: list[tuple[int, Any, str]] | None = None  # (index, handle, name) once initialised

    def devices(self) -> tuple[MemorySnapshot, ...]:
        nvml = self._module()
        errors = getattr(nvml, "NVMLError", OSError)
        try:
            return tuple(self._read(nvml, index, handle, name) for index, handle, name in self._open(nvml))
        except errors as exc:
            self._close(nvml)  # re-initialise next time: the driver may be back
            where = "" if self.device_index is None else f" (GPU {self.device_index})"
            raise ProbeError(f"nvml probe{where}: {exc}") from exc

    def _read(self, nvml: Any, index: int, handle: Any, name: str) -> MemorySnapshot:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
        return MemorySnapshot(self.name, int(info.total), int(info.used), int(info.free), f"GPU {index} {name}".rstrip(),
                              device=f"cuda:{index}", utilization_percent=_optional(
                                  lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu), nvml),
                              temperature_c=_optional(lambda: int(nvml.nvmlDeviceGetTemperature(
                                  handle, getattr(nvml, "NVML_TEMPERATURE_GPU", 0))), nvml))

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = _import_pynvml()
            except ImportError as exc:
                raise ProbeError("nvml probe needs the nvidia-ml-py package (import pynvml failed)") from exc
        return self._nvml

    def _close(self, nvml: Any) -> None:
        if self._handles is not None:
            self._handles = None
            _quiet_shutdown(nvml)

    def _open(self, nvml: Any) -> list[tuple[int, Any, str]]:
        """Initialise once per probe: nvmlInit is reference-counted and not free."""
        if self._handles is None:
            nvml.nvmlInit()
            try:
                indexes = [self.device_index] if self.device_index is not None else range(nvml.nvmlDeviceGetCount())
                handles = [(i, h, _text(nvml.nvmlDeviceGetName(h)))
                           for i in indexes for h in [nvml.nvmlDeviceGetHandleByIndex(i)]]
                if not handles:
                    raise ProbeError("nvml probe: the driver lists no GPU")
            except Exception:
                _quiet_shutdown(nvml)  # balance nvmlInit: the next look inits again
                raise
            self._handles = handles
        return self._handles


def _optional(read, nvml: Any) -> int | None:
    """A figure not every GPU or driver gives (utilization on some vGPUs, temperature on some boards)."""
    try:
        return read()
    except (getattr(nvml, "NVMLError", OSError), AttributeError):
        return None
