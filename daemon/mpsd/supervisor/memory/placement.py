"""Which device a worker goes to: a pure function of the devices' room, the model's device and where it was.

A model's `device` says which of the probe's devices its workers may use
(`eligible`): "cuda" (and "auto" where the probe sees GPUs) means any GPU, or
those its `devices` list names; "cuda:2" pins; "cpu" and "mps" name theirs.
A probe that sees one device (a Mac's unified memory, host RAM, `nvml:N`, a
one-device file) holds every worker, whatever its device says, as before.

`choose` puts a worker where it fits with the most room to spare: the device
with the most free memory after its footprint, ties going to the device with
the fewest replicas of its model, so four replicas on four equal GPUs land one
per GPU. A worker that was placed before goes back there while it fits (a
restart or reload does not move it), and goes elsewhere only when memory says
so (a replica that died of OOM on a full GPU may start on an emptier one).
Where it fits only once live prefix caches shrink, the device needing the
least is taken; where it fits nowhere, the device with the most room, whose
numbers its refusal then gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class DeviceRoom:
    """One device as placement sees it: room now, and room once every live prefix cache there is at 0."""

    device: str
    free_bytes: int
    floor_bytes: int


def eligible(model_device: str, allowed: Sequence[str], devices: Sequence[str]) -> tuple[list[str], str]:
    """The probe's devices the model's workers may use, in the probe's order; ([], why) when there is none."""
    if len(devices) == 1:
        return list(devices), ""
    gpus = [d for d in devices if d.startswith("cuda:")]
    seen = f"the memory probe reports {', '.join(devices)}"
    if model_device in ("cuda", "auto") and (gpus or model_device == "cuda"):
        chosen = [d for d in gpus if not allowed or d in allowed]
        if chosen:
            return chosen, ""
        return [], f"no GPU to place it on: {seen}" + (f"; its devices list {', '.join(allowed)}" if allowed else "")
    if model_device == "auto":  # no GPU: the worker's auto falls back to MPS or the CPU
        own = next((d for d in ("mps", "cpu") if d in devices), None)
        return ([own], "") if own else (list(devices), "")
    if model_device in devices:
        return [model_device], ""
    return [], f"device {model_device} is not one the memory probe sees ({seen})"


def choose(rooms: Sequence[DeviceRoom], need_bytes: int, floor_need_bytes: int, replicas: Mapping[str, int],
           previous: str = "") -> DeviceRoom:
    """rooms: the eligible devices (never empty); need_bytes: the worker's footprint; floor_need_bytes: what it
    needs with its own prefix cache left out; replicas: its model's live workers per device."""
    order = {room.device: i for i, room in enumerate(rooms)}

    def best(candidates: list[DeviceRoom], room_of) -> DeviceRoom:
        kept = next((r for r in candidates if r.device == previous), None)
        return kept or max(candidates, key=lambda r: (room_of(r), -replicas.get(r.device, 0), -order[r.device]))

    fits = [r for r in rooms if r.free_bytes >= need_bytes]
    if fits:
        return best(fits, lambda r: r.free_bytes)
    shrinking = [r for r in rooms if r.floor_bytes >= floor_need_bytes]
    if shrinking:
        return best(shrinking, lambda r: r.free_bytes)
    return max(rooms, key=lambda r: (r.floor_bytes, -replicas.get(r.device, 0), -order[r.device]))
