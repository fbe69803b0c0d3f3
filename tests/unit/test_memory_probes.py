"""Memory probes with fakes injected where they read the OS (sysctl, psutil,
pynvml, libproc): no Mac or GPU is needed, and no figure is hard-coded in
the probes themselves. Mac numbers follow docs/macos.md "Memory"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import namedtuple

import pytest
from mpsd.config import MemoryConfig
from mpsd.config.schema import DeviceMemoryConfig
from mpsd.supervisor.memory.probes import (
    CombinedProbe,
    FileMemoryProbe,
    HostMemoryProbe,
    MacMemoryProbe,
    MemorySnapshot,
    NvmlMemoryProbe,
    ProbeError,
    ReportedWorkingSet,
    apply_overrides,
    make_probe,
    nvml_available,
    read_sysctl_int,
)

GiB = 1024**3
MiB = 1024**2

LinuxVM = namedtuple("LinuxVM", "total available percent used free")
MacVM = namedtuple("MacVM", "total available percent used free active inactive wired")


def mac_vm(total: int, wired: int, available: int = 0) -> MacVM:
    return MacVM(total, available, 0.0, 0, 0, 0, 0, wired)


def sysctl(values: dict[str, int | None]):
    calls: list[str] = []

    def read(name: str) -> int | None:
        calls.append(name)
        return values.get(name)

    read.calls = calls
    return read


# --- snapshot -------------------------------------------------------------


def test_snapshot_detail_defaults_to_empty_and_old_positional_form_still_works():
    snap = MemorySnapshot("host", 10, 4, 6)
    assert snap.detail == ""
    assert MemorySnapshot("x", 1, 2, 3, "note").detail == "note"


# --- host -----------------------------------------------------------------


def test_host_probe_uses_total_and_available():
    vm = LinuxVM(total=64 * GiB, available=40 * GiB, percent=37.5, used=20 * GiB, free=30 * GiB)
    snap = HostMemoryProbe(virtual_memory=lambda: vm).snapshot()
    assert (snap.probe, snap.budget_bytes, snap.used_bytes, snap.available_bytes) == (
        "host", 64 * GiB, 24 * GiB, 40 * GiB,
    )
    assert "64.0GiB" in snap.detail


def test_host_probe_real_psutil_is_consistent():
    snap = HostMemoryProbe().snapshot()
    assert snap.budget_bytes > 0
    assert snap.used_bytes + snap.available_bytes == snap.budget_bytes


# --- file -----------------------------------------------------------------


def write(path, data) -> None:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")


def test_file_probe_derives_available_and_rereads_after_rewrite(tmp_path):
    path = tmp_path / "mem.json"
    write(path, {"budget_bytes": 100, "used_bytes": 30})
    probe = FileMemoryProbe(path)
    [snap] = probe.devices()
    assert (snap.probe, snap.budget_bytes, snap.used_bytes, snap.available_bytes) == (f"file:{path}", 100, 30, 70)
    assert snap.device == "default"
    write(path, {"budget_bytes": 100, "used_bytes": 130})
    assert probe.devices()[0].available_bytes == 0  # never negative
    write(path, {"budget_bytes": 200, "used_bytes": 50, "available_bytes": 120})
    assert (probe.devices()[0].budget_bytes, probe.devices()[0].available_bytes) == (200, 120)


def test_file_probe_describes_several_devices_each_with_its_own_figures(tmp_path):
    path = tmp_path / "mem.json"
    write(path, {"devices": [{"device": "cuda:0", "budget_bytes": 80, "used_bytes": 10},
                             {"device": "cuda:1", "budget_bytes": 40, "used_bytes": 50},
                             {"device": "cpu", "budget_bytes": 100, "used_bytes": 1, "available_bytes": 60}]})
    devices = FileMemoryProbe(path).devices()
    assert [(d.device, d.budget_bytes, d.used_bytes, d.available_bytes) for d in devices] == [
        ("cuda:0", 80, 10, 70), ("cuda:1", 40, 50, 0), ("cpu", 100, 1, 60)]


@pytest.mark.parametrize(("devices", "words"), [
    ([], "devices must be a non-empty list"),
    ({"device": "cuda:0"}, "devices must be a non-empty list"),
    (["cuda:0"], "devices[0] must be an object"),
    ([{"budget_bytes": 1, "used_bytes": 0}], "devices[0].device must be a name"),
    ([{"device": "cuda:0", "budget_bytes": 1}], "devices[0].used_bytes: missing"),
    ([{"device": "cuda:0", "budget_bytes": 1, "used_bytes": -1}], "devices[0].used_bytes cannot be negative"),
    ([{"device": "cuda:0", "budget_bytes": 1, "used_bytes": 0, "free": 1}], "devices[0].free: unknown key"),
    ([{"device": "a", "budget_bytes": 1, "used_bytes": 0}, {"device": "a", "budget_bytes": 1, "used_bytes": 0}],
     "device names repeat"),
])
def test_file_probe_device_errors_name_the_entry_and_key(tmp_path, devices, words):
    path = tmp_path / "mem.json"
    write(path, {"devices": devices})
    with pytest.raises(ProbeError) as info:
        FileMemoryProbe(path).devices()
    assert str(path) in str(info.value) and words in str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot read"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"used_bytes": 1}, "missing key 'budget_bytes'"),
        ({"budget_bytes": 1}, "missing key 'used_bytes'"),
        ({"budget_bytes": -1, "used_bytes": 0}, "budget_bytes cannot be negative"),
        ({"budget_bytes": 10, "used_bytes": "5"}, "used_bytes must be an integer"),
        ({"budget_bytes": 10.5, "used_bytes": 5}, "budget_bytes must be an integer"),
        ({"budget_bytes": True, "used_bytes": 5}, "budget_bytes must be an integer"),
        ({"budget_bytes": 10, "used_bytes": 5, "available_bytes": -3}, "available_bytes cannot be negative"),
    ],
)
def test_file_probe_errors_name_the_file_and_the_problem(tmp_path, content, words):
    path = tmp_path / "mem.json"
    if content is not None:
        write(path, content)
    with pytest.raises(ProbeError) as info:
        FileMemoryProbe(path).devices()
    assert str(path) in str(info.value)
    assert words in str(info.value)
    assert isinstance(info.value, ValueError)  # admin status catches ValueError


# --- macOS ----------------------------------------------------------------


def test_mac_probe_wired_limit_set_gives_112_gib():
    read = sysctl({"iogpu.wired_limit_mb": 114688})
    probe = MacMemoryProbe(
        sysctl_int=read,
        virtual_memory=lambda: mac_vm(128 * GiB, wired=30 * GiB),
        working_set_bytes=lambda: round(107.52 * GiB),  # the limit wins over the report
    )
    snap = probe.snapshot()
    assert read.calls == ["iogpu.wired_limit_mb"]
    assert snap.probe == "macos"
    assert snap.budget_bytes == 112 * GiB
    assert snap.used_bytes == 30 * GiB
    assert snap.available_bytes == 82 * GiB
    assert snap.detail == "iogpu.wired_limit_mb=114688"


def test_mac_probe_limit_zero_uses_worker_reported_working_set():
    reported = ReportedWorkingSet()
    probe = MacMemoryProbe(
        sysctl_int=sysctl({"iogpu.wired_limit_mb": 0}),
        virtual_memory=lambda: mac_vm(128 * GiB, wired=8 * GiB),
        working_set_bytes=reported,
    )
    assert "estimated" in probe.snapshot().detail  # before any worker reported
    reported.set(round(107.52 * GiB))
    snap = probe.snapshot()
    assert snap.budget_bytes == round(107.52 * GiB)
    assert snap.available_bytes == round(107.52 * GiB) - 8 * GiB
    assert "worker report" in snap.detail


@pytest.mark.parametrize(
    ("total", "expected"),
    [(16 * GiB, 16 * GiB * 2 // 3), (32 * GiB, 32 * GiB * 2 // 3), (64 * GiB, 48 * GiB), (128 * GiB, 96 * GiB)],
)
def test_mac_probe_estimates_when_nothing_is_known(total, expected):
    probe = MacMemoryProbe(
        sysctl_int=sysctl({}),  # sysctl failed: None
        virtual_memory=lambda: mac_vm(total, wired=2 * GiB),
        working_set_bytes=lambda: None,
    )
    snap = probe.snapshot()
    assert snap.budget_bytes == expected
    assert snap.used_bytes == 2 * GiB
    assert "estimated" in snap.detail


def test_mac_probe_available_never_negative():
    probe = MacMemoryProbe(
        sysctl_int=sysctl({"iogpu.wired_limit_mb": 1024}),
        virtual_memory=lambda: mac_vm(16 * GiB, wired=3 * GiB),
    )
    snap = probe.snapshot()
    assert (snap.budget_bytes, snap.available_bytes) == (1 * GiB, 0)


def test_mac_probe_without_wired_figure_is_a_probe_error():
    vm = LinuxVM(total=8 * GiB, available=4 * GiB, percent=50.0, used=4 * GiB, free=4 * GiB)
    with pytest.raises(ProbeError, match="wired"):
        MacMemoryProbe(sysctl_int=sysctl({}), virtual_memory=lambda: vm).snapshot()


def test_reported_working_set_ignores_nonsense():
    reported = ReportedWorkingSet()
    reported.set(0)
    assert reported() is None
    reported.set(5 * GiB)
    assert reported() == 5 * GiB
    reported.set(None)
    assert reported() is None


def fake_run(stdout: str = "", returncode: int = 0, raises: Exception | None = None):
    seen: list[list[str]] = []

    def run(argv, **kwargs):
        seen.append(argv)
        assert kwargs["timeout"] <= 5
        if raises:
            raise raises
        return subprocess.CompletedProcess(argv, returncode, stdout, "")

    run.seen = seen
    return run


def test_read_sysctl_int_parses_output_and_runs_the_right_command():
    run = fake_run("114688\n")
    assert read_sysctl_int("iogpu.wired_limit_mb", run=run) == 114688
    assert run.seen == [["/usr/sbin/sysctl", "-n", "iogpu.wired_limit_mb"]]


@pytest.mark.parametrize(
    "run",
    [
        fake_run("", returncode=1),
        fake_run("garbage"),
        fake_run(raises=subprocess.TimeoutExpired("sysctl", 2)),
        fake_run(raises=FileNotFoundError("no sysctl")),
    ],
)
def test_read_sysctl_int_returns_none_on_any_failure(run):
    assert read_sysctl_int("iogpu.wired_limit_mb", run=run) is None


def test_read_sysctl_int_for_real_does_not_raise():
    value = read_sysctl_int("iogpu.wired_limit_mb")
    assert value is None or isinstance(value, int)


# --- NVML -----------------------------------------------------------------


class FakeNVMLError(Exception):
    pass


def fake_nvml(devices: list[tuple[str | bytes, int, int]], init_error: bool = False):
    """A stand-in for pynvml: devices are (name, total, used)."""
    state = {"init": 0, "shutdown": 0}

    def init():
        if init_error:
            raise FakeNVMLError("Driver Not Loaded")
        state["init"] += 1

    def handle(index):
        if index >= len(devices):
            raise FakeNVMLError("Invalid Argument")
        return ("handle", index)

    def memory_info(h):
        _, total, used = devices[h[1]]
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    module = types.SimpleNamespace(
        NVMLError=FakeNVMLError,
        nvmlInit=init,
        nvmlShutdown=lambda: state.__setitem__("shutdown", state["shutdown"] + 1),
        nvmlDeviceGetCount=lambda: len(devices),
        nvmlDeviceGetHandleByIndex=handle,
        nvmlDeviceGetMemoryInfo=memory_info,
        nvmlDeviceGetName=lambda h: devices[h[1]][0],
    )
    module.state = state
    return module


H100 = ("NVIDIA H100 80GB HBM3", 85520809984, 600 * MiB)


def test_nvml_probe_reads_one_gpu():
    nvml = fake_nvml([H100, (b"NVIDIA A10", 24 * GiB, 20 * GiB)])
    [snap] = NvmlMemoryProbe(0, nvml=nvml).devices()
    assert (snap.probe, snap.budget_bytes, snap.used_bytes, snap.available_bytes, snap.device) == (
        "nvml:0", 85520809984, 600 * MiB, 85520809984 - 600 * MiB, "cuda:0",
    )
    assert snap.detail == "GPU 0 NVIDIA H100 80GB HBM3"
    [second] = NvmlMemoryProbe(1, nvml=nvml).devices()
    assert (second.probe, second.budget_bytes, second.available_bytes) == ("nvml:1", 24 * GiB, 4 * GiB)
    assert second.detail == "GPU 1 NVIDIA A10"  # bytes names decoded


def test_nvml_probe_reads_every_gpu_with_utilization_and_temperature_where_the_driver_gives_them():
    nvml = fake_nvml([H100, (b"NVIDIA A10", 24 * GiB, 20 * GiB)])
    nvml.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=[87, 3][h[1]], memory=0)
    nvml.NVML_TEMPERATURE_GPU = 0

    def temperature(handle, sensor):
        if handle[1] == 1:
            raise FakeNVMLError("Not Supported")
        return 61
    nvml.nvmlDeviceGetTemperature = temperature
    devices = NvmlMemoryProbe(nvml=nvml).devices()
    assert [(d.probe, d.device, d.budget_bytes, d.utilization_percent, d.temperature_c) for d in devices] == [
        ("nvml", "cuda:0", 85520809984, 87, 61), ("nvml", "cuda:1", 24 * GiB, 3, None)]
    assert NvmlMemoryProbe(nvml=fake_nvml([H100])).devices()[0].utilization_percent is None  # no such call


def test_nvml_probe_initialises_once():
    nvml = fake_nvml([H100])
    probe = NvmlMemoryProbe(nvml=nvml)
    probe.devices()
    probe.devices()
    assert nvml.state["init"] == 1


def test_nvml_probe_errors_are_probe_errors_and_balance_init():
    nvml = fake_nvml([H100])
    with pytest.raises(ProbeError, match="GPU 3.*Invalid Argument"):
        NvmlMemoryProbe(3, nvml=nvml).devices()
    assert nvml.state["init"] == nvml.state["shutdown"] == 1
    with pytest.raises(ProbeError, match="Driver Not Loaded"):
        NvmlMemoryProbe(0, nvml=fake_nvml([H100], init_error=True)).devices()
    with pytest.raises(ProbeError, match="no GPU"):
        NvmlMemoryProbe(nvml=fake_nvml([])).devices()


def test_nvml_probe_without_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    with pytest.raises(ProbeError, match="nvidia-ml-py"):
        NvmlMemoryProbe().devices()


def test_nvml_available_with_fakes():
    assert nvml_available(fake_nvml([H100])) is True
    assert nvml_available(fake_nvml([])) is False
    assert nvml_available(fake_nvml([H100], init_error=True)) is False
    broken = fake_nvml([H100])
    broken.nvmlDeviceGetCount = lambda: (_ for _ in ()).throw(FakeNVMLError("GPU is lost"))
    assert nvml_available(broken) is False
    assert broken.state["shutdown"] == 1


def test_nvml_available_false_when_package_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert nvml_available() is False


def test_nvml_available_for_real_never_raises():
    assert nvml_available() in (True, False)


# --- make_probe -----------------------------------------------------------


def never() -> bool:
    raise AssertionError("nvml_available must not be consulted here")


def test_make_probe_explicit_choices(tmp_path):
    assert isinstance(make_probe(MemoryConfig(probe="host"), nvml_available=never), HostMemoryProbe)
    file_probe = make_probe(MemoryConfig(probe=f"file:{tmp_path / 'm.json'}"), nvml_available=never)
    assert isinstance(file_probe, FileMemoryProbe) and file_probe.path == tmp_path / "m.json"
    mac = make_probe(MemoryConfig(probe="macos"), platform="linux", nvml_available=never)
    assert isinstance(mac, MacMemoryProbe)
    every = make_probe(MemoryConfig(probe="nvml"), nvml_available=never)
    gpu2 = make_probe(MemoryConfig(probe="nvml:2"), nvml_available=never)
    assert (every.name, gpu2.name, gpu2.device_index) == ("nvml+host", "nvml:2", 2)


def test_make_probe_rejects_unknown_names():
    with pytest.raises(ProbeError):
        make_probe(MemoryConfig(probe="nvml:x"))
    with pytest.raises(ProbeError):
        make_probe(MemoryConfig(probe="gpu"))


def test_make_probe_auto_on_mac_passes_the_worker_report_through():
    reported = ReportedWorkingSet()
    reported.set(round(107.52 * GiB))
    probe = make_probe(MemoryConfig(probe="auto"), platform="darwin", working_set_bytes=reported, nvml_available=never)
    assert isinstance(probe, MacMemoryProbe)
    probe._sysctl_int = sysctl({"iogpu.wired_limit_mb": 0})
    probe._virtual_memory = lambda: mac_vm(128 * GiB, wired=0)
    assert probe.snapshot().budget_bytes == round(107.52 * GiB)


def test_make_probe_auto_elsewhere_prefers_nvml_then_host():
    auto = MemoryConfig(probe="auto")
    assert make_probe(auto, platform="linux", nvml_available=lambda: True).name == "nvml+host"
    assert isinstance(make_probe(auto, platform="linux", nvml_available=lambda: False), HostMemoryProbe)


def test_make_probe_auto_without_pynvml_is_host(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert isinstance(make_probe(MemoryConfig(probe="auto"), platform="linux"), HostMemoryProbe)


# --- apply_overrides ------------------------------------------------------


def test_apply_overrides_without_budget_is_identity():
    snap = MemorySnapshot("macos", 100, 30, 70, "iogpu.wired_limit_mb=0")
    assert apply_overrides(snap, MemoryConfig(headroom_bytes=50)) is snap


def test_apply_overrides_replaces_budget_and_recomputes_available_ignoring_headroom():
    snap = MemorySnapshot("macos", 112 * GiB, 30 * GiB, 82 * GiB, "iogpu.wired_limit_mb=114688")
    out = apply_overrides(snap, MemoryConfig(budget_bytes=96 * GiB, headroom_bytes=8 * GiB))
    assert (out.probe, out.budget_bytes, out.used_bytes, out.available_bytes) == (
        "macos", 96 * GiB, 30 * GiB, 66 * GiB,
    )
    assert out.detail.startswith("iogpu.wired_limit_mb=114688; ")
    assert "[memory] budget" in out.detail
    low = apply_overrides(snap, MemoryConfig(budget_bytes=10 * GiB))
    assert low.available_bytes == 0


def test_a_devices_own_budget_overrides_the_memory_tables_for_that_device_only():
    config = MemoryConfig(budget_bytes=70 * GiB, headroom_bytes=GiB,
                          devices=(DeviceMemoryConfig("cuda:1", budget_bytes=20 * GiB, headroom_bytes=2 * GiB),))
    gpu0 = apply_overrides(MemorySnapshot("nvml", 80 * GiB, 0, 80 * GiB, device="cuda:0"), config)
    gpu1 = apply_overrides(MemorySnapshot("nvml", 80 * GiB, 0, 80 * GiB, device="cuda:1"), config)
    assert (gpu0.budget_bytes, gpu1.budget_bytes) == (70 * GiB, 20 * GiB)
    assert '[memory.devices."cuda:1"] budget' in gpu1.detail and "[memory] budget" in gpu0.detail
    assert (config.headroom_for("cuda:0"), config.headroom_for("cuda:1")) == (GiB, 2 * GiB)


def test_combined_probe_lists_the_gpus_then_host_ram():
    probe = CombinedProbe(NvmlMemoryProbe(nvml=fake_nvml([H100, H100])), HostMemoryProbe(
        virtual_memory=lambda: LinuxVM(total=64 * GiB, available=40 * GiB, percent=0.0, used=0, free=0)))
    assert [d.device for d in probe.devices()] == ["cuda:0", "cuda:1", "cpu"]


# --- process footprint ----------------------------------------------------
