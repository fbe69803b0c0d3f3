"""Memory probes: what the machine can hold, behind one interface.

A snapshot is budget (the ceiling workers may use), used and available, in
the currency that runs out first on that machine: wired memory on a Mac
(Metal buffers are wired), device memory on an NVIDIA GPU, RAM elsewhere.
The file probe reads numbers a person or a test writes, the honest stand-in
for a Mac's wired memory on machines that have none.

The daemon must never import torch or mlx (they would claim Metal/CUDA in the
supervisor), so every figure here comes from the OS: psutil, sysctl, libproc,
NVML. What only Metal knows (the recommended working set) a worker reports.
See docs/macos.md, "Memory".
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Protocol

import psutil

from mpsd.config import MemoryConfig
from mpsd.units import format_bytes

GiB = 1024**3
MiB = 1024**2

SYSCTL = "/usr/sbin/sysctl"
WIRED_LIMIT_SYSCTL = "iogpu.wired_limit_mb"

WorkingSetSource = Callable[[], int | None]
SysctlReader = Callable[[str], int | None]


class ProbeError(ValueError):
    """A probe could not read its source; callers show the message as is."""


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    probe: str
    budget_bytes: int
    used_bytes: int
    available_bytes: int
    detail: str = ""


class MemoryProbe(Protocol):
    name: str

    def snapshot(self) -> MemorySnapshot: ...


# --- host -----------------------------------------------------------------


class HostMemoryProbe:
    """Host RAM: the ceiling for CPU workers on Linux."""

    name = "host"

    def __init__(self, virtual_memory: Callable[[], Any] = psutil.virtual_memory) -> None:
        self._virtual_memory = virtual_memory

    def snapshot(self) -> MemorySnapshot:
        vm = self._virtual_memory()
        detail = f"{format_bytes(vm.total)} RAM"
        return MemorySnapshot(self.name, vm.total, vm.total - vm.available, vm.available, detail)


# --- file -----------------------------------------------------------------


class FileMemoryProbe:
    """JSON {"budget_bytes": .., "used_bytes": ..}, re-read on every snapshot
    so a test (or a person) can change what the daemon sees while it runs."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.name = f"file:{self.path}"

    def snapshot(self) -> MemorySnapshot:
        data = self._read()
        budget = self._size(data, "budget_bytes")
        used = self._size(data, "used_bytes")
        available = self._size(data, "available_bytes") if "available_bytes" in data else max(budget - used, 0)
        return MemorySnapshot(self.name, budget, used, available)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ProbeError(f"memory file {self.path}: cannot read it ({exc.strerror or exc})") from exc
        except ValueError as exc:
            raise ProbeError(f"memory file {self.path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise ProbeError(f"memory file {self.path}: expected a JSON object, got {type(data).__name__}")
        return data

    def _size(self, data: dict[str, Any], key: str) -> int:
        if key not in data:
            raise ProbeError(f"memory file {self.path}: missing key {key!r}")
        value = data[key]
        # bool is an int subclass; true/false is a typo, not a size.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ProbeError(f"memory file {self.path}: {key} must be an integer number of bytes, got {value!r}")
        if value < 0:
            raise ProbeError(f"memory file {self.path}: {key} cannot be negative, got {value}")
        return value


# --- macOS ----------------------------------------------------------------


def read_sysctl_int(name: str, *, run: Callable[..., Any] = subprocess.run) -> int | None:
    """Integer sysctl, or None; a missing key or tool must not fail a status call."""
    try:
        result = run([SYSCTL, "-n", name], capture_output=True, text=True, timeout=2.0, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return None
    try:
        return int(result.stdout.strip())
    except ValueError:
        return None


class ReportedWorkingSet:
    """Holds the Metal recommended working set as last reported by a worker.

    Only a process that opened a Metal device can read that figure, and the
    daemon must not; so a worker reports it and the daemon stores it here.
    An instance is a callable suitable for make_probe(working_set_bytes=...).
    """

    def __init__(self) -> None:
        self._bytes: int | None = None

    def set(self, value: int | None) -> None:
        self._bytes = value if value and value > 0 else None

    def __call__(self) -> int | None:
        return self._bytes


def estimated_working_set(total_ram: int) -> int:
    """Metal's rule of thumb when nobody has told us: ~2/3 of RAM on small Macs, 3/4 on large."""
    return total_ram * 2 // 3 if total_ram < 64 * GiB else total_ram * 3 // 4


class MacMemoryProbe:
    """Wired memory against the GPU wired ceiling (Apple silicon).

    Metal buffers are wired, so wired memory is what runs out first. The
    ceiling is, in order: iogpu.wired_limit_mb when set (> 0); the Metal
    recommended working set as a worker reported it; an estimate from RAM.
    """

    name = "macos"

    def __init__(
        self,
        sysctl_int: SysctlReader = read_sysctl_int,
        virtual_memory: Callable[[], Any] = psutil.virtual_memory,
        working_set_bytes: WorkingSetSource = lambda: None,
    ) -> None:
        self._sysctl_int = sysctl_int
        self._virtual_memory = virtual_memory
        self._working_set_bytes = working_set_bytes

    def snapshot(self) -> MemorySnapshot:
        vm = self._virtual_memory()
        wired = getattr(vm, "wired", None)
        if wired is None:
            raise ProbeError("macos memory probe: psutil reports no wired memory on this system")
        budget, detail = self._budget(vm.total)
        return MemorySnapshot(self.name, budget, wired, max(budget - wired, 0), detail)

    def _budget(self, total_ram: int) -> tuple[int, str]:
        limit_mb = self._sysctl_int(WIRED_LIMIT_SYSCTL)
        if limit_mb is not None and limit_mb > 0:
            return limit_mb * MiB, f"{WIRED_LIMIT_SYSCTL}={limit_mb}"
        reported = self._working_set_bytes()
        if isinstance(reported, int) and reported > 0:
            return reported, "Metal recommended working set (worker report)"
        budget = estimated_working_set(total_ram)
        share = "2/3" if total_ram < 64 * GiB else "3/4"
        return budget, f"estimated {share} of {format_bytes(total_ram)} RAM (no wired limit, no worker report yet)"


# --- NVIDIA ---------------------------------------------------------------


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
    """Device memory of one NVIDIA GPU, from the driver (no CUDA context)."""

    def __init__(self, device_index: int = 0, nvml: Any = None) -> None:
        self.device_index = device_index
        self.name = f"nvml:{device_index}"
        self._nvml = nvml
        self._handle: Any = None
        self._device_name = ""

    def snapshot(self) -> MemorySnapshot:
        nvml = self._module()
        errors = getattr(nvml, "NVMLError", OSError)
        try:
            handle = self._open(nvml)
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
        except errors as exc:
            self._close(nvml)  # re-initialise next time: the driver may be back
            raise ProbeError(f"nvml probe (GPU {self.device_index}): {exc}") from exc
        detail = f"GPU {self.device_index} {self._device_name}".rstrip()
        return MemorySnapshot(self.name, int(info.total), int(info.used), int(info.free), detail)

    def _module(self) -> Any:
        if self._nvml is None:
            try:
                self._nvml = _import_pynvml()
            except ImportError as exc:
                raise ProbeError("nvml probe needs the nvidia-ml-py package (import pynvml failed)") from exc
        return self._nvml

    def _close(self, nvml: Any) -> None:
        if self._handle is not None:
            self._handle = None
            _quiet_shutdown(nvml)

    def _open(self, nvml: Any) -> Any:
        """Initialise once per probe: nvmlInit is reference-counted and not free."""
        if self._handle is None:
            nvml.nvmlInit()
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
                self._device_name = _text(nvml.nvmlDeviceGetName(handle))
            except Exception:
                _quiet_shutdown(nvml)  # balance nvmlInit: the next snapshot inits again
                raise
            self._handle = handle
        return self._handle


# --- choice and overrides -------------------------------------------------


def make_probe(
    config: MemoryConfig,
    *,
    platform: str = sys.platform,
    working_set_bytes: WorkingSetSource = lambda: None,
    nvml_available: Callable[[], bool] = nvml_available,
) -> MemoryProbe:
    """The probe named in [memory] probe; "auto" picks what runs out first here."""
    probe = config.probe
    if probe.startswith("file:"):
        return FileMemoryProbe(pathlib.Path(probe[5:]))
    if probe == "host":
        return HostMemoryProbe()
    if probe == "macos":
        return MacMemoryProbe(working_set_bytes=working_set_bytes)
    if probe == "nvml" or probe.startswith("nvml:"):
        return NvmlMemoryProbe(_gpu_index(probe))
    if probe == "auto":
        return _auto_probe(platform, working_set_bytes, nvml_available)
    raise ProbeError(f"unknown memory probe {probe!r} (auto, host, macos, nvml, nvml:N, file:PATH)")


def _auto_probe(platform: str, working_set_bytes: WorkingSetSource, nvml_ok: Callable[[], bool]) -> MemoryProbe:
    if platform == "darwin":
        return MacMemoryProbe(working_set_bytes=working_set_bytes)
    if nvml_ok():
        return NvmlMemoryProbe(0)
    return HostMemoryProbe()


def _gpu_index(probe: str) -> int:
    text = probe.partition(":")[2] or "0"
    if not text.isdigit():
        raise ProbeError(f"memory probe {probe!r}: GPU index must be a number, as in nvml:1")
    return int(text)


def apply_overrides(snapshot: MemorySnapshot, config: MemoryConfig) -> MemorySnapshot:
    """[memory] budget replaces what the probe says the ceiling is; headroom
    is left to admission so status shows the machine's own figures."""
    if config.budget_bytes is None:
        return snapshot
    available = max(config.budget_bytes - snapshot.used_bytes, 0)
    note = f"budget from [memory] budget (probe said {format_bytes(snapshot.budget_bytes)})"
    detail = f"{snapshot.detail}; {note}" if snapshot.detail else note
    return dataclasses.replace(
        snapshot, budget_bytes=config.budget_bytes, available_bytes=available, detail=detail
    )
