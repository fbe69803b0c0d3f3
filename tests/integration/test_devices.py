"""Several devices in one host, described by a file probe: placement, per-device admission and CUDA_VISIBLE_DEVICES.

This machine has no GPU; the file probe is the stand-in for four (docs/multi-gpu.md), and every worker is a real
process running its model on the CPU (its device "auto" falls back there), started with the one GPU it was placed
on as CUDA_VISIBLE_DEVICES, which it reports in its status. What a GPU adds is checked by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import json
import os
import signal

import psutil
from support import metric, wait_for

GiB = 1024**3
GPUS = [f"cuda:{i}" for i in range(4)]


def write_devices(path, budgets: dict[str, int]) -> None:
    path.write_text(json.dumps({"devices": [{"device": d, "budget_bytes": b, "used_bytes": 0}
                                            for d, b in budgets.items()]}))


CONFIG = """
[daemon]
restart_delay = "0.1s"
health_interval = "0.3s"

[memory]
probe = "file:{probe}"

[[models]]
name = "mlp"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
device = "auto"
replicas = 5
threads = 1
footprint = "6GiB"
"""


def workers(daemon) -> dict[str, dict]:
    return {w["id"]: w for w in daemon.status()["workers"]}


def ready_on(daemon) -> dict[str, str]:
    return {w["id"]: w["placed_device"] for w in workers(daemon).values() if w["state"] == "READY"}


def test_four_replicas_land_one_per_device_a_fifth_is_refused_with_its_devices_numbers_and_freeing_one_admits_it(
        make_daemon, tmp_path):
    probe = tmp_path / "devices.json"
    write_devices(probe, {gpu: 10 * GiB for gpu in GPUS})
    daemon = make_daemon(CONFIG.format(probe=probe))
    wait_for(lambda: len(ready_on(daemon)) == 4 and workers(daemon)["mlp-4"]["state"] == "REFUSED", 90,
             "four READY, the fifth REFUSED")
    placed = ready_on(daemon)
    assert sorted(placed.values()) == GPUS, f"one per device: {placed}"
    for worker_id, gpu in placed.items():
        worker = daemon.worker(worker_id)
        index = gpu.partition(":")[2]
        assert psutil.Process(worker["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == index
        assert worker["visible_devices"] == index and worker["device"] == "cpu"  # its torch device, here

    fifth = daemon.worker("mlp-4")
    assert fifth["reason"].startswith("no room on any of its 4 devices; most on cuda:")
    assert "needs 6.0GiB, 4.0GiB free of 10.0GiB budget after 0B headroom" in fifth["reason"]
    memory = daemon.status()["memory"]
    assert [d["device"] for d in memory["devices"]] == GPUS
    assert all(len(d["workers"]) == 1 and d["free_for_workers_bytes"] == 4 * GiB for d in memory["devices"])
    assert metric(daemon, "mpsd_device_memory_free_for_workers_bytes", device="cuda:3") == 4 * GiB
    assert metric(daemon, "mpsd_device_workers", device="cuda:2") == 1

    write_devices(probe, {**{gpu: 10 * GiB for gpu in GPUS}, "cuda:2": 16 * GiB})  # room for a second on cuda:2
    wait_for(lambda: daemon.worker("mlp-4")["state"] == "READY", 60, "the fifth READY")
    fifth = daemon.worker("mlp-4")
    assert fifth["placed_device"] == "cuda:2" and fifth["visible_devices"] == "2"
    assert psutil.Process(fifth["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == "2"

    # A restart goes back to its device while it fits there.
    victim = next(w for w, gpu in placed.items() if gpu == "cuda:1")
    old_pid = daemon.worker(victim)["pid"]
    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: (w := daemon.worker(victim))["state"] == "READY" and w["pid"] != old_pid, 60, "restarted")
    assert daemon.worker(victim)["placed_device"] == "cuda:1"


def test_a_pinned_model_waits_for_its_own_device_and_a_device_list_restricts_the_choice(make_daemon, tmp_path):
    probe = tmp_path / "devices.json"
    write_devices(probe, {"cuda:0": 10 * GiB, "cuda:1": 4 * GiB, "cuda:2": 10 * GiB})
    daemon = make_daemon(f"""
[daemon]
health_interval = "0.3s"

[memory]
probe = "file:{probe}"

[[models]]
name = "pinned"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
device = "cuda:1"
threads = 1
footprint = "6GiB"

[[models]]
name = "listed"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
device = "auto"
devices = ["cuda:1", "cuda:2"]
threads = 1
footprint = "6GiB"

[[models]]
name = "nowhere"
backend = "torch-module"
factory = "fixtures.tiny_modules:seeded_linear"
device = "cuda:7"
threads = 1
footprint = "1GiB"
""")
    wait_for(lambda: daemon.worker("listed-0")["state"] == "READY" and daemon.worker("pinned-0")["state"] == "REFUSED"
             and daemon.worker("nowhere-0")["state"] == "REFUSED", 60, "listed READY, the others REFUSED")
    assert daemon.worker("listed-0")["placed_device"] == "cuda:2", "cuda:0 is not in its list; cuda:1 is too small"
    pinned = daemon.worker("pinned-0")
    assert pinned["reason"] == "on cuda:1: needs 6.0GiB, 4.0GiB free of 4.0GiB budget after 0B headroom"
    assert "device cuda:7 is not one the memory probe sees" in daemon.worker("nowhere-0")["reason"]
    # Room on its device: it is started there, as CUDA's device 0 of the one it sees; with no GPU here, torch
    # refuses it at boot, which says so (on a GPU machine, benchmarks/gpu_check.sh sees it serve).
    write_devices(probe, {"cuda:0": 10 * GiB, "cuda:1": 8 * GiB, "cuda:2": 10 * GiB})
    worker = wait_for(lambda: (w := daemon.worker("pinned-0"))["state"] == "FATAL" and w, 60, "pinned started")
    assert worker["placed_device"] == "cuda:1"
    assert "device 'cuda' was configured but torch sees no CUDA device" in worker["reason"]


READ_BARS = """
return Array.from(document.querySelectorAll("#device-bars .bar"), bar => ({
  device: bar.dataset.device,
  live: Array.from(bar.querySelectorAll(".seg.live"), s => s.dataset.worker),
}));
"""


def test_the_status_page_draws_a_memory_bar_per_device_with_its_workers(make_daemon, tmp_path, browser):
    probe = tmp_path / "devices.json"
    write_devices(probe, {"cuda:0": 10 * GiB, "cuda:1": 10 * GiB})
    daemon = make_daemon(CONFIG.format(probe=probe).replace("replicas = 5", "replicas = 2"))
    daemon.wait_ready(2)
    placed = {w["placed_device"]: w["id"] for w in workers(daemon).values()}
    browser.get(daemon.metrics_url.removesuffix("metrics"))
    bars = wait_for(lambda: len(b := browser.execute_script(READ_BARS)) == 2 and all(x["live"] for x in b) and b, 15,
                    "two device bars, each with its worker")
    assert {bar["device"]: bar["live"] for bar in bars} == {"cuda:0": [placed["cuda:0"]], "cuda:1": [placed["cuda:1"]]}
    assert not browser.execute_script('return document.getElementById("memory-bar").offsetParent')  # hidden
