"""Faults under load: a hung worker, a Metal OOM abort mid-stream, the daemon killed or stopped.

Each test prints its figures (streams sent, completed, failed; time to
detect; restarts) and asserts invariants: every stream ends, with its full
answer or with UNAVAILABLE and a reason; nothing is left running.

The Metal OOM cannot happen on this machine, so it is injected at the
boundary the daemon observes: the worker's own stderr carries the line a Mac
prints (written through /proc/PID/fd/2) and the worker dies by SIGABRT, as
a Metal abort does. The daemon's classification and recovery are real.
"""

import contextlib
import os
import signal
import time

import grpc
import pytest

from support import Stream, pid_alive, wait_for

METAL_OOM_LINE = ("libc++abi: terminating due to uncaught exception of type std::runtime_error: "
                  "[METAL] Command buffer execution failed: Insufficient Memory "
                  "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)\n")
HEALTH = {"interval": 0.5, "timeout": 2.0}


def slow_fleet(slow_model, *, replicas=2, concurrency=2, extra_daemon="", extra_model="") -> str:
    return f"""
[daemon]
drain_grace = "30s"
health_interval = "{HEALTH['interval']}s"
health_timeout = "{HEALTH['timeout']}s"
{extra_daemon}

[[models]]
name = "slow"
backend = "torch-lm"
path = "{slow_model}"
replicas = {replicas}
concurrency = {concurrency}
threads = 1
queue = 16
{extra_model}
"""


def inflight(daemon) -> dict[str, int]:
    return {w["id"]: w["inflight"] for w in daemon.status()["workers"]}


def ready_ids(daemon) -> list[str]:
    return sorted(w["id"] for w in daemon.status()["workers"] if w["state"] == "READY")


def test_a_stopped_worker_fails_its_streams_within_the_health_timeout_and_a_tokenless_request_is_retried(
        make_daemon, slow_model):
    daemon = make_daemon(slow_fleet(slow_model))
    daemon.wait_ready(2)
    # Least-outstanding routing with oldest-assigned tie-break makes the placement certain:
    # long -> X, doomed -> Y, filler -> X, then tokenless -> Y (the stopped one).
    long = Stream(daemon, 400).started()
    x = next(w for w, n in inflight(daemon).items() if n == 1)
    doomed = Stream(daemon, 400).started()
    y = next(w for w, n in inflight(daemon).items() if n == 1 and w != x)
    y_pid = daemon.worker(y)["pid"]
    os.kill(y_pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        filler = Stream(daemon, 30).started()
        tokenless = Stream(daemon, 30)
        wait_for(lambda: inflight(daemon)[y] == 2, 10, "the tokenless request to reach the stopped worker")
        doomed.join(30)
        tokenless.join(60)
        filler.join(60)
        long.join(120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(y_pid, signal.SIGKILL)
    detected_s = doomed.ended_at - stopped_at
    replaced = wait_for(lambda: (w := daemon.worker(y))["state"] == "READY" and w["pid"] != y_pid and w, 60, "a replacement")
    print(f"\nSIGSTOP {y} pid {y_pid}: its stream ended {detected_s:.1f}s later ({doomed.summary()}); "
          f"tokenless request: {tokenless.summary()}; other streams: {long.summary()}, {filler.summary()}; "
          f"restarts {replaced['restarts']}")
    assert doomed.error.code() == grpc.StatusCode.UNAVAILABLE and doomed.messages
    assert f"worker {y}" in doomed.error.details() and "killed as hung" in doomed.error.details()
    assert detected_s < HEALTH["timeout"] + 2 * HEALTH["interval"] + 1.0, "ended within the health timeout"
    assert tokenless.completed and tokenless.messages[-1].finish.worker_pid != y_pid, "retried on a live worker"
    assert long.completed and filler.completed and long.worker_id == filler.worker_id == x
    assert "retrying once on another worker" in daemon.log()
    assert replaced["restarts"] == 1 and "killed as hung" in replaced["last_exit"]


def inject_metal_oom(pid: int) -> None:
    """What the daemon sees when Metal aborts a Mac worker: the line on its stderr, then SIGABRT."""
    with open(f"/proc/{pid}/fd/2", "w") as stderr:
        stderr.write(METAL_OOM_LINE)
    os.kill(pid, signal.SIGABRT)


def test_a_metal_oom_abort_mid_stream_fails_only_that_workers_streams_and_does_not_loop(
        make_daemon, slow_model, tmp_path):
    probe = tmp_path / "memory.json"  # a fixed budget: no memory "frees" by chance, so no retry is due
    probe.write_text('{"budget_bytes": 8589934592, "used_bytes": 0}')
    daemon = make_daemon(slow_fleet(slow_model, extra_daemon=f'[memory]\nprobe = "file:{probe}"'))
    daemon.wait_ready(2)
    streams = [Stream(daemon, 300).started() for _ in range(4)]
    victim = daemon.status()["workers"][1]
    assert victim["inflight"] == 2
    inject_metal_oom(victim["pid"])
    for stream in streams:
        stream.join(120)
    failed = [s for s in streams if not s.completed]
    oomed = wait_for(lambda: (w := daemon.worker(victim["id"]))["state"] == "OOM" and w, 30, "the OOM state")
    model = daemon.status()["models"][0]
    spawned = daemon.log().count("spawned")
    time.sleep(3)  # long enough for several admission ticks (0.1 s) and one restart delay
    print(f"\nMetal OOM in {victim['id']} under 4 streams: " + "; ".join(s.summary() for s in streams) +
          f"; ready {model['ready']} of {model['replicas']}; footprint now {model['footprint_bytes']} ({model['footprint_source']})")
    assert len(failed) == 2, "exactly the two streams on the aborted worker fail"
    for stream in failed:
        assert stream.error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert victim["id"] in stream.error.details() and "out of memory" in stream.error.details()
    assert all(s.worker_id != victim["id"] for s in streams if s.completed)
    assert "SIGABRT" in oomed["reason"] and "footprint raised" in oomed["reason"]
    assert model["ready"] == 1 and model["footprint_source"] == "learned"
    assert daemon.worker(victim["id"])["state"] == "OOM" and daemon.log().count("spawned") == spawned, "no restart loop"
    assert daemon.generate("The", model="slow", max_tokens=5)[-1].finish.worker_id != victim["id"]


def test_sigkill_of_the_daemon_under_load_leaves_no_worker_and_a_new_daemon_starts_cleanly(make_daemon, slow_model):
    daemon = make_daemon(slow_fleet(slow_model))
    daemon.wait_ready(2)
    pids = [w["pid"] for w in daemon.status()["workers"]]
    streams = [Stream(daemon, 400).started() for _ in range(4)]
    daemon.process.kill()
    killed_at = time.monotonic()
    daemon.process.wait(5)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 2, "every worker to exit within 2 s")
    workers_gone_s = time.monotonic() - killed_at
    for stream in streams:
        stream.join(30)
    leftovers = sorted(p.name for p in daemon.state_dir.rglob("*"))
    daemon.start()  # same state dir: a stale admin socket and worker sockets are there
    daemon.wait_ready(2)
    answer = daemon.generate("The", model="slow", max_tokens=5)
    print(f"\nSIGKILL mpsd under 4 streams: workers gone in {workers_gone_s:.2f}s; streams "
          f"{sorted(s.error.code().name for s in streams)}; left behind {leftovers}; restarted daemon answered")
    assert all(s.error is not None and s.error.code() == grpc.StatusCode.UNAVAILABLE for s in streams)
    assert "admin.sock" in leftovers, "the test really exercised a stale socket"
    assert answer[-1].HasField("finish")
    assert "another mpsd" not in daemon.log()


def test_sigterm_under_load_finishes_every_stream_refuses_new_ones_and_exits_0(make_daemon, slow_model):
    daemon = make_daemon(slow_fleet(slow_model))
    daemon.wait_ready(2)
    pids = [w["pid"] for w in daemon.status()["workers"]]
    streams = [Stream(daemon, 150).started() for _ in range(4)]
    queued = Stream(daemon, 20)  # concurrency is 2 x 2: this one waits in the queue, and is still served
    wait_for(lambda: daemon.status()["models"][0]["queued"] == 1, 10, "a queued request")
    daemon.process.send_signal(signal.SIGTERM)
    wait_for(lambda: "draining" in daemon.log(), 10, "the daemon to start draining")
    refusals = []
    while any(s.alive for s in streams) and len(refusals) < 20:
        with pytest.raises(grpc.RpcError) as refused:
            daemon.generate("The", model="slow", max_tokens=3)
        refusals.append(refused.value)
        time.sleep(0.2)
    for stream in streams + [queued]:
        stream.join(60)
    code = daemon.process.wait(60)
    print(f"\nSIGTERM under 4 streams + 1 queued: " + "; ".join(s.summary() for s in streams + [queued]) +
          f"; {len(refusals)} new requests refused; exit {code}")
    assert all(s.completed for s in streams + [queued])
    assert refusals and {e.code() for e in refusals} == {grpc.StatusCode.UNAVAILABLE}
    assert all("draining" in e.details() for e in refusals)
    assert code == 0 and "-> STOPPED" in daemon.log()
    wait_for(lambda: not any(pid_alive(p) for p in pids), 5, "workers to be gone")
