"""Placement as a pure decision: which devices a model may use, and which one a waiting worker goes to."""

from __future__ import annotations

import pathlib

import pytest
from mpsd.config import ModelConfig
from mpsd.supervisor.fleet.worker_env import device_env, worker_spec
from mpsd.supervisor.memory.placement import DeviceRoom, choose, eligible

GiB = 1024**3
FOUR = ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cpu"]


@pytest.mark.parametrize(("device", "allowed", "expected"), [
    ("cuda", (), ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("auto", (), ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
    ("auto", ("cuda:3", "cuda:1"), ["cuda:1", "cuda:3"]),
    ("cuda:2", (), ["cuda:2"]),
    ("cpu", (), ["cpu"]),
])
def test_a_models_device_says_which_of_the_probes_devices_it_may_use(device, allowed, expected):
    assert eligible(device, allowed, FOUR) == (expected, "")


def test_one_device_holds_every_worker_whatever_its_device_says():
    assert eligible("cuda:3", (), ["mps"]) == (["mps"], "")
    assert eligible("cpu", (), ["cuda:0"]) == (["cuda:0"], "")


def test_auto_without_a_gpu_counts_where_the_worker_will_run():
    assert eligible("auto", (), ["mps", "cpu"]) == (["mps"], "")
    assert eligible("auto", (), ["a", "b", "cpu"]) == (["cpu"], "")


@pytest.mark.parametrize(("device", "allowed", "devices", "words"), [
    ("cuda:7", (), FOUR, "device cuda:7 is not one the memory probe sees (the memory probe reports cuda:0, cuda:1"),
    ("mps", (), FOUR, "device mps is not one"),
    ("cuda", (), ["cpu", "other"], "no GPU to place it on"),
    ("cuda", ("cuda:9",), FOUR, "its devices list cuda:9"),
])
def test_no_device_it_may_use_says_why(device, allowed, devices, words):
    names, why = eligible(device, allowed, devices)
    assert names == [] and words in why


def rooms(*free: int, floor: int | None = None) -> list[DeviceRoom]:
    return [DeviceRoom(f"cuda:{i}", f, f if floor is None else floor) for i, f in enumerate(free)]


def test_the_device_with_the_most_room_after_the_footprint_wins():
    assert choose(rooms(10 * GiB, 30 * GiB, 20 * GiB), 6 * GiB, 6 * GiB, {}).device == "cuda:1"


def test_ties_go_to_the_fewest_replicas_of_the_model_then_the_probes_order():
    equal = rooms(*[10 * GiB] * 4)
    assert choose(equal, GiB, GiB, {"cuda:0": 1, "cuda:1": 1}).device == "cuda:2"
    assert choose(equal, GiB, GiB, {}).device == "cuda:0"


def test_a_worker_goes_back_to_its_device_while_it_fits_there_and_elsewhere_when_it_does_not():
    assert choose(rooms(10 * GiB, 30 * GiB), 6 * GiB, 6 * GiB, {}, previous="cuda:0").device == "cuda:0"
    assert choose(rooms(4 * GiB, 30 * GiB), 6 * GiB, 6 * GiB, {}, previous="cuda:0").device == "cuda:1"


def test_where_it_fits_only_once_caches_shrink_that_device_is_taken_and_where_it_fits_nowhere_the_roomiest():
    shrinkable = [DeviceRoom("cuda:0", 5 * GiB, 5 * GiB), DeviceRoom("cuda:1", 2 * GiB, 9 * GiB)]
    assert choose(shrinkable, 6 * GiB, 6 * GiB, {}).device == "cuda:1"
    assert choose(rooms(1 * GiB, 3 * GiB, 2 * GiB), 6 * GiB, 6 * GiB, {}).device == "cuda:1"


def model(device: str, **fields) -> ModelConfig:
    return ModelConfig(name="m", backend="torch-lm", path="/m", device=device, **fields)


def test_a_worker_placed_on_a_gpu_sees_only_that_gpu_and_calls_it_cuda():
    for device in ("cuda", "auto", "cuda:2"):
        assert device_env(model(device), "cuda:2") == {"CUDA_VISIBLE_DEVICES": "2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    spec = worker_spec("m-0", model("cuda:2"), pathlib.Path("/run/0.sock"), 5.0, "cuda:2")
    assert (spec.device, spec.placed_device) == ("cuda", "cuda:2")
    assert worker_spec("m-0", model("auto"), pathlib.Path("/run/0.sock"), 5.0, "cuda:1").device == "auto"


def test_the_view_is_left_alone_off_gpus_for_a_pin_elsewhere_and_where_the_models_env_sets_it():
    assert device_env(model("cpu"), "cpu") == {}
    assert device_env(model("cuda:1"), "cuda:0") == {}  # a one-device nvml:0 probe holds it; it runs where pinned
    assert device_env(model("cuda", env={"CUDA_VISIBLE_DEVICES": "3"}), "cuda:2") == {}
    spec = worker_spec("m-0", model("cuda:1"), pathlib.Path("/run/0.sock"), 5.0, "cuda:0")
    assert spec.device == "cuda:1"
