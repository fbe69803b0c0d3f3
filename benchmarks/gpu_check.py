"""The GPU check (issue 26): on a machine with CUDA, what no test here can show; skipped with a reason elsewhere.

`benchmarks/gpu_check.sh` runs it. It starts one mpsd with the NVML probe and
  * `device = "cuda"` demo replicas, one per visible GPU: placement must put one on each, each started with its one
    GPU as CUDA_VISIBLE_DEVICES and reporting a CUDA device;
  * a model whose factory allocates past its GPU at load: a real CUDA out-of-memory, which must read as OOM and not
    be retried in a loop;
then compares NVML's figures (the probe's) with torch.cuda.mem_get_info, and batched decode throughput through mpsd
against the same decode loop in this process on the same GPU. It prints one summary line and exits 1 on a failure.
"""

from __future__ import annotations

import concurrent.futures
import sys
import time

STREAMS, TOKENS = 16, 128
OOM_WATCH_S = 15.0
MIB = 1 << 20


def _config(gpus: int) -> str:
    return f"""
[daemon]
restart_delay = "0.5s"
health_interval = "0.5s"

[memory]
probe = "nvml"

[[models]]
name = "demo"
backend = "torch-lm"
path = "@demo"
device = "cuda"
replicas = {gpus}

[[models]]
name = "oomy"
backend = "torch-module"
factory = "benchmarks.gpu_check:allocate_past_the_gpu"
device = "cuda:0"
footprint = "1GiB"
"""


def allocate_past_the_gpu():
    """A torch-module factory that asks its GPU for twice what it has: torch raises CUDA's out-of-memory error."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    torch.empty(2 * total, dtype=torch.uint8, device="cuda")
    return torch.nn.Identity()


def _skip_reason() -> str:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        import pynvml  # noqa: F401
    except ImportError:
        return 'the NVML probe needs nvidia-ml-py: pip install -c constraints.txt -e ".[nvml]"'
    return ""


def _placement(daemon, gpus: int) -> str:
    status = daemon.wait_ready(gpus, timeout=180)
    demo = [w for w in status["workers"] if w["model"] == "demo"]
    placed = sorted(w["placed_device"] for w in demo)
    assert placed == [f"cuda:{i}" for i in range(gpus)], f"placement: {placed}"
    for worker in demo:
        index = worker["placed_device"].partition(":")[2]
        assert worker["visible_devices"] == index, f"{worker['id']}: CUDA_VISIBLE_DEVICES {worker['visible_devices']}"
        assert worker["device"].startswith("cuda"), f"{worker['id']} runs on {worker['device']}"
    pairs = ", ".join(w["id"] + "->" + w["placed_device"] for w in demo)
    return f"placement ok ({pairs})"


def _oom(daemon) -> str:
    deadline = time.monotonic() + OOM_WATCH_S
    worker = None
    while time.monotonic() < deadline:
        worker = next(w for w in daemon.status()["workers"] if w["model"] == "oomy")
        time.sleep(0.5)
    assert worker["state"] == "OOM", f"oomy is {worker['state']}: {worker['reason']} / {worker['last_exit']}"
    assert worker["restarts"] <= 1, f"oomy restarted {worker['restarts']} times in {OOM_WATCH_S:g}s"
    return f"CUDA OOM recognised ({worker['restarts'] + 1} start(s) in {OOM_WATCH_S:g}s)"


def _nvml_vs_torch(daemon) -> str:
    import torch

    devices = {d["device"]: d for d in daemon.status()["memory"]["devices"]}
    worst = 0
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        seen = devices[f"cuda:{index}"]
        assert seen["budget_bytes"] == total, f"cuda:{index}: NVML total {seen['budget_bytes']} != torch {total}"
        worst = max(worst, abs(seen["used_bytes"] - (total - free)))
    return f"NVML vs torch.cuda.mem_get_info used within {worst / MIB:.0f} MiB"


def _through_mpsd(daemon) -> float:
    from mpsd.v1 import inference_pb2

    def one(_):
        return sum(1 for m in daemon.inference.Generate(inference_pb2.GenerateRequest(
            model="demo", prompt="The module", max_tokens=TOKENS, temperature=0), timeout=120) if not m.HasField("finish"))
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(STREAMS) as pool:
        tokens = sum(pool.map(one, range(STREAMS)))
    return tokens / (time.perf_counter() - started)


def _in_process(model_dir: str) -> float:
    from mpsd.generate_params import GenerateParams
    from mpsd.worker.backends.torch_lm import TorchCausalLM
    from mpsd.worker.backends.base import TokenEvent
    from mpsd.worker.scheduler import DecodeScheduler
    from mpsd.worker.sinks import QueueSink

    scheduler = DecodeScheduler(TorchCausalLM(model_dir, "cuda"), STREAMS)
    scheduler.start()
    params = GenerateParams(prompt="The module", max_tokens=TOKENS, temperature=0.0, top_p=1.0, seed=0, stop=())
    started = time.perf_counter()
    sinks = [QueueSink() for _ in range(STREAMS)]
    for sink in sinks:
        scheduler.submit(params, None, sink)
    tokens = sum(1 for sink in sinks for event in sink if isinstance(event, TokenEvent))
    elapsed = time.perf_counter() - started
    scheduler.stop()
    return tokens / elapsed


def main() -> int:
    reason = _skip_reason()
    if reason:
        print(f"gpu_check: SKIPPED: {reason}")
        return 0
    import torch
    from mpsd import paths

    from benchmarks.daemon_run import RunningDaemon

    gpus = torch.cuda.device_count()
    daemon = RunningDaemon(_config(gpus))
    results = []
    try:
        results.append(_placement(daemon, gpus))
        results.append(_oom(daemon))
        results.append(_nvml_vs_torch(daemon))
        served = _through_mpsd(daemon)
    except AssertionError as exc:
        print(f"gpu_check: FAILED: {exc}; passed so far: {'; '.join(results) or 'nothing'}")
        return 1
    finally:
        daemon.stop()
    alone = _in_process(str(paths.demo_model_dir(paths.default_data_dir())))
    results.append(f"batched decode {STREAMS} streams: mpsd {served:.0f} tok/s vs in-process {alone:.0f} tok/s "
                   f"({served / alone:.2f}x)")
    print(f"gpu_check: PASSED on {gpus} GPU(s) ({torch.cuda.get_device_name(0)}): {'; '.join(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
