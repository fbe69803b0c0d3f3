import signal

import pytest
from mpsd.exitcodes import EXIT_BOOT_FAILURE
from mpsd.oom import (
    HTTP_OOM_SIGNATURES, OOM_SIGNATURES, OOM_WARNING_SIGNATURES, exception_oom, find_oom_signature, http_error_oom,
)
from mpsd.supervisor.fleet.exits import ExitKind, classify_exit

# One recorded line per signature (docs/macos.md, "How out-of-memory looks"), each must be recognised.
RECORDED_OOM_LINES = {
    "kIOGPUCommandBufferCallbackErrorOutOfMemory":
        "[METAL] Command buffer execution failed: Insufficient Memory (00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "Insufficient Memory": "ggml_metal_graph_compute: command buffer 0 failed with status 5 Insufficient Memory",
    r"\[metal::malloc\]": "RuntimeError: [metal::malloc] Attempting to allocate 137438953472 bytes which is greater than the maximum allowed buffer size of 77309411328 bytes.",
    r"\[malloc\] Unable to allocate": "RuntimeError: [malloc] Unable to allocate 8589934592 bytes.",
    "MPS backend out of memory": "RuntimeError: MPS backend out of memory (MPS allocated: 17.00 GB, other allocations: 1.20 GB, max allowed: 18.13 GB). Tried to allocate 256.00 MB on private pool.",
    "CUDA out of memory": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
    r"torch\.OutOfMemoryError": "torch.OutOfMemoryError: allocation failed",
    # llama.cpp / ggml (llama-server, llama-cpp-python, ds4-server) on Metal and CUDA
    "kIOAccelCommandBufferCallbackErrorSubmissionsIgnored":
        "ggml_metal_graph_compute: command buffer 1 failed with status 5 "
        "error: Ignored (for causing prior/excessive GPU errors) (00000004:kIOAccelCommandBufferCallbackErrorSubmissionsIgnored)",
    r"ggml_metal_graph_compute: command buffer \d+ failed with status 5":
        "ggml_metal_graph_compute: command buffer 3 failed with status 5",
    r"ggml_metal_synchronize: error: command buffer \d+ failed with status 5":
        "ggml_metal_synchronize: error: command buffer 0 failed with status 5",
    "cudaMalloc failed: out of memory":
        "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 81920.00 MiB on device 0: cudaMalloc failed: out of memory",
}


def test_every_signature_has_a_recorded_line():
    assert {s for s, _ in OOM_SIGNATURES} == set(RECORDED_OOM_LINES)


@pytest.mark.parametrize("signature,line", sorted(RECORDED_OOM_LINES.items()))
def test_each_oom_signature_is_recognised(signature, line):
    assert find_oom_signature(["loading", line]) is not None
    verdict = classify_exit(-signal.SIGABRT, ["libc++abi: terminating due to uncaught exception", line])
    assert verdict.kind == ExitKind.OOM


def test_metal_abort_is_oom_with_the_signal_in_the_description():
    verdict = classify_exit(-6, [RECORDED_OOM_LINES["kIOGPUCommandBufferCallbackErrorOutOfMemory"]])
    assert verdict.kind == ExitKind.OOM and "SIGABRT" in verdict.description


def test_innocent_victim_is_not_this_workers_oom():
    line = "[METAL] Command buffer execution failed: Insufficient Memory (00000005:kIOGPUCommandBufferCallbackErrorInnocentVictim)"
    assert classify_exit(-6, [line]).kind == ExitKind.CRASH


def test_plain_abort_is_a_crash():
    assert classify_exit(-6, ["Fatal Python error: Aborted"]).kind == ExitKind.CRASH


def test_sigkill_is_killed_and_says_likely_cause():
    verdict = classify_exit(-9, [])
    assert verdict.kind == ExitKind.KILLED and "OOM killer" in verdict.description


def test_boot_failure_carries_the_last_stderr_line():
    verdict = classify_exit(EXIT_BOOT_FAILURE, ["mpsd worker 1: boot failure: no config.json", ""])
    assert verdict.kind == ExitKind.BOOT_FAILURE and "no config.json" in verdict.description


def test_clean_and_requested_stops():
    assert classify_exit(0, []).kind == ExitKind.CLEAN
    assert classify_exit(-15, [], stop_requested=True).kind == ExitKind.CLEAN
    assert classify_exit(-15, []).kind == ExitKind.CRASH
    assert classify_exit(1, ["Traceback"]).kind == ExitKind.CRASH


def test_an_oom_exception_inside_a_request_is_recognised():
    class OutOfMemoryError(RuntimeError):
        pass
    OutOfMemoryError.__module__ = "torch"
    assert exception_oom(OutOfMemoryError("allocation failed")) is not None
    assert exception_oom(RuntimeError(RECORDED_OOM_LINES["MPS backend out of memory"])) is not None
    assert exception_oom(ValueError("shapes do not match")) is None


def test_the_metal_working_set_warning_makes_a_later_crash_an_oom():
    (signature, _), = OOM_WARNING_SIGNATURES
    line = ("ggml_metal_graph_compute: warning: current allocated size is greater than the recommended max working set"
            " size")
    assert signature.split()[0] in line
    verdict = classify_exit(-6, ["llama_decode: failed to decode", line])
    assert verdict.kind == ExitKind.OOM and "probably" in verdict.description
    assert classify_exit(0, [line]).kind == ExitKind.CLEAN
    assert find_oom_signature([line]) is None  # a warning alone is no OOM


@pytest.mark.parametrize("body", [
    '{"error": {"message": "prefill failed", "type": "server_error"}}',   # ds4-server#890
    '{"error": {"code": 500, "message": "ggml_metal_synchronize: error: command buffer 0 failed with status 5"}}',
    '{"detail": "CUDA error: out of memory"}',
])
def test_an_engines_http_500_with_an_oom_text_is_an_oom_of_that_request(body):
    assert http_error_oom(500, body) is not None
    assert http_error_oom(400, body) is None


def test_an_engines_other_500_is_not_an_oom():
    assert http_error_oom(500, '{"error": "template rendering failed"}') is None
    assert {s for s, _ in OOM_SIGNATURES} <= {s for s, _ in HTTP_OOM_SIGNATURES}
