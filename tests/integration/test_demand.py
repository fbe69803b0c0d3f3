"""Memory on demand with a real daemon and real workers: load on request, evict for room, stop when idle.

Memory comes from a file probe so that admission and eviction work with known
numbers: every model's footprint is configured as 10 GiB and the file says
0 bytes used, so admission counts exactly the live workers' footprints (the
rest of the machine is max(0, used - live) = 0): a 25 GiB budget holds two
workers, 15 GiB one. Most models are null-lm (a worker is READY in a fraction
of a second); the slow torch model holds a worker busy for seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time

import grpc
import pytest
from mpsd.supervisor.memory.demand import SCALE_UP_COOLDOWN_S
from mpsd.v1 import admin_pb2, inference_pb2
from support import Daemon, Stream, metric, wait_for, write_probe

GiB = 1024**3
SLOW_TOKENS = 1000  # ~9 s on the slow model here (n_positions 1024): a stream that outlasts every check made during it
EVICTED = "(needs 10.0GiB, 5.0GiB free)"


def lm(name: str, **keys) -> str:
    """A null-lm model table: loaded on demand (min_replicas 0), one worker at most, unless keys say otherwise."""
    keys = {"min_replicas": 0, "max_replicas": 1, **keys}
    return _table(name, "null-lm", keys)


def slow_lm(name: str, path, **keys) -> str:
    """The slow torch model, one sequence per worker: a stream on it keeps its worker busy."""
    return _table(name, "torch-lm", {"path": str(path), "concurrency": 1, "threads": 1, "min_replicas": 0,
                                     "max_replicas": 1, **keys})


def _table(name: str, backend: str, keys: dict) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in {"name": name, "backend": backend, "footprint": "10GiB",
                                                                **keys}.items()]
    return "\n[[models]]\n" + "\n".join(lines) + "\n"


def demand_config(tmp_path, budget_gib: int, min_residency: str, *models: str) -> str:
    probe = tmp_path / "memory.json"
    write_probe(probe, budget=budget_gib * GiB)
    return f"""
[daemon]
health_interval = "0.5s"
drain_grace = "20s"

[memory]
probe = "file:{probe}"
min_residency = "{min_residency}"
""" + "".join(models)


def served_by(daemon: Daemon, model: str, timeout: float = 30.0) -> str:
    """Generates three tokens; the worker that served them."""
    messages = list(daemon.inference().Generate(
        inference_pb2.GenerateRequest(model=model, prompt="x", max_tokens=3), timeout=timeout))
    assert messages[-1].HasField("finish") and messages[-1].finish.usage.completion_tokens == 3
    return messages[-1].finish.worker_id


def refused(daemon: Daemon, model: str, timeout: float) -> grpc.RpcError:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        served_by(daemon, model, timeout)
    assert time.monotonic() - started < timeout + 5, "answered around its deadline, not after a hang"
    return caught.value


def model_status(daemon: Daemon, name: str) -> dict:
    return next(m for m in daemon.status()["models"] if m["name"] == name)


def worker_of(daemon: Daemon, worker_id: str) -> dict | None:
    """The worker's status, or None once it is gone (demand removes the workers it stops)."""
    return next((w for w in daemon.status()["workers"] if w["id"] == worker_id), None)


def worker_states(daemon: Daemon) -> dict[str, str]:
    return {w["id"]: w["state"] for w in daemon.status()["workers"]}


def evictions(daemon: Daemon) -> list[tuple[str, str]]:
    """(worker, the model it made room for), one per eviction, in the order the log has them."""
    return re.findall(r"demand: (\S+) evicted for model (\S+) ", daemon.log())


def demand_starts(daemon: Daemon) -> list[str]:
    return re.findall(r"demand: (\S+) started on demand", daemon.log())


class Watch:
    """Reads status on its own thread through a whole scenario, so what happens between requests is seen too."""

    PROCESS_STATES = {"STARTING", "READY", "DRAINING"}

    def __init__(self, daemon: Daemon, interval_s: float = 0.05) -> None:
        self._stub = daemon.admin()
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.most_processes = 0                  # workers holding a process at once, all models together
        self.most_held: dict[str, int] = {}      # model -> most workers it held at once (status "desired")
        self.changes: list[tuple[float, str, str]] = []  # (monotonic, model, last_change) as each was first seen
        self.error: Exception | None = None

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(30)
        if exc_info[0] is None:
            assert self.error is None, f"status failed while watching: {self.error}"

    def _run(self) -> None:
        last: dict[str, str] = {}
        while not self._stop.is_set():
            try:
                status = self._stub.Status(admin_pb2.StatusRequest(), timeout=10)
            except grpc.RpcError as exc:
                self.error = exc
                return
            now = time.monotonic()
            self.most_processes = max(self.most_processes, sum(w.state in self.PROCESS_STATES for w in status.workers))
            for model in status.models:
                self.most_held[model.name] = max(self.most_held.get(model.name, 0), model.desired)
                if model.last_change and last.get(model.name) != model.last_change:
                    last[model.name] = model.last_change
                    self.changes.append((now, model.name, model.last_change))
            self._stop.wait(self._interval_s)

    def first_seen(self, model: str, prefix: str) -> float:
        return next(t for t, name, change in self.changes if name == model and change.startswith(prefix))


def test_three_models_with_room_for_two_take_turns_and_the_least_recently_used_is_evicted(make_daemon, tmp_path):
    daemon = make_daemon(demand_config(tmp_path, 25, "0.5s", lm("a"), lm("b"), lm("c")))
    served, sent_at = [], {}
    with Watch(daemon) as watch:
        for turn, name in enumerate("abcabc"):
            sent_at[turn] = time.monotonic()
            served.append(served_by(daemon, name))
    assert served == ["a-0", "b-0", "c-0", "a-1", "b-1", "c-1"], "every request was served, each by a fresh load"
    assert watch.most_processes == 2, "never more than two workers held memory, and two did"
    assert evictions(daemon) == [("a-0", "c"), ("b-0", "a"), ("c-0", "b"), ("a-1", "c")], \
        "each time, the idle model used longest ago made room"
    assert model_status(daemon, "a")["last_change"] == f"a-1 evicted for model c {EVICTED}"
    assert worker_states(daemon) == {"b-1": "READY", "c-1": "READY"}
    for name, evicted in (("a", 2), ("b", 1), ("c", 1)):
        assert metric(daemon, "mpsd_demand_loads_total", model=name) == 2
        assert metric(daemon, "mpsd_demand_stops_total", model=name, reason="evicted") == evicted
        assert metric(daemon, "mpsd_requests_waited_for_load_total", model=name) == 2
    # a-0 was started about a second before "a" came back: a model with no worker at all loads at once, not after
    # the scale-up cooldown (which paces a model's second and later workers).
    started_after = watch.first_seen("a", "a-1 started on demand") - sent_at[3]
    assert started_after < min(1.5, SCALE_UP_COOLDOWN_S / 2), f"a-1 started {started_after:.1f}s after its request"


def test_a_busy_worker_is_never_evicted_and_the_waiting_model_loads_once_its_stream_ends(make_daemon, tmp_path,
                                                                                         slow_model):
    daemon = make_daemon(demand_config(tmp_path, 15, "1s", slow_lm("slow", slow_model, replicas=1), lm("c")))
    daemon.wait_ready(1)
    pid = daemon.worker("slow-0")["pid"]
    stream = Stream(daemon, SLOW_TOKENS, model="slow").started()

    hurried = refused(daemon, "c", timeout=1.5)
    assert hurried.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, hurried.details()
    assert hurried.details() == ("model 'c': deadline passed waiting for memory: needs 10.0GiB, 5.0GiB free of 15.0GiB "
                                 "budget after 0B headroom; nothing evictable (slow-0 busy)")
    patient = Stream(daemon, 3, model="c", timeout=120)
    c0 = wait_for(lambda: (w := daemon.worker("c-0"))["state"] == "REFUSED" and "nothing evictable (slow-0 busy)"
                  in w["reason"] and w, 30, "c-0 REFUSED, naming the busy worker")
    assert c0["reason"].startswith("needs 10.0GiB, 5.0GiB free of 15.0GiB budget")
    holder = worker_of(daemon, "slow-0") or {}
    assert (holder.get("state"), holder.get("pid")) == ("READY", pid), "the busy worker holds its memory"
    assert stream.alive and patient.alive, "the stream must outlast these checks (make SLOW_TOKENS larger)"
    assert metric(daemon, "mpsd_demand_stops_total", model="slow", reason="evicted") == 0

    stream.join(120)
    assert stream.completed and stream.worker_id == "slow-0", stream.summary()
    patient.join(60)
    assert patient.completed and patient.worker_id == "c-0", patient.summary()
    assert patient.first_token_at > stream.ended_at - 0.5, "c was served once the stream had ended"
    # slow is a torch-lm: its prefix cache (25% of its estimate) counted as room before the eviction, and named
    assert re.fullmatch(r"slow-0 evicted for model c \(needs 10\.0GiB, 5\.0GiB free, [0-9.]+MiB more in prefix caches\)",
                        model_status(daemon, "slow")["last_change"]), model_status(daemon, "slow")["last_change"]
    assert metric(daemon, "mpsd_demand_loads_total", model="c") == 1, "one load for both requests"


def test_idle_workers_stop_after_keep_alive_down_to_min_replicas(make_daemon, tmp_path):
    daemon = make_daemon(demand_config(tmp_path, 25, "0s", lm("m", keep_alive="1s"),
                                       lm("pinned", min_replicas=1, keep_alive="1s")))
    daemon.wait_ready(1)
    assert served_by(daemon, "m") == "m-0"
    wait_for(lambda: model_status(daemon, "m")["desired"] == 0, 30, "m back to min_replicas 0")
    shown = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir), "status",
                            "--json"], capture_output=True, text=True, timeout=60)
    m = next(model for model in json.loads(shown.stdout)["models"] if model["name"] == "m")
    assert {k: m[k] for k in ("min_replicas", "max_replicas", "live", "desired", "priority", "last_change")} == {
        "min_replicas": 0, "max_replicas": 1, "live": 0, "desired": 0, "priority": 0,
        "last_change": "m-0 stopped: idle 1s"}
    assert "m-0" not in worker_states(daemon), "an idle stop removes the worker"
    # pinned-0 was idle longer than m-0, past the same keep_alive, on the tick that stopped m-0: min_replicas held it.
    assert worker_states(daemon) == {"pinned-0": "READY"}
    assert [metric(daemon, "mpsd_demand_stops_total", model=name, reason="idle") for name in ("m", "pinned")] == [1, 0]
    assert served_by(daemon, "m") == "m-1", "the next request loads it again"
    assert metric(daemon, "mpsd_demand_loads_total", model="m") == 2


def test_a_burst_of_queued_requests_scales_up_to_max_replicas_and_back_down_when_idle(make_daemon, tmp_path,
                                                                                       slow_model):
    daemon = make_daemon(demand_config(tmp_path, 100, "0s", slow_lm("slow", slow_model, min_replicas=1, max_replicas=2,
                                                             keep_alive="1s")))
    daemon.wait_ready(1)
    with Watch(daemon) as watch:
        burst = [Stream(daemon, SLOW_TOKENS, model="slow") for _ in range(6)]
        try:
            wait_for(lambda: model_status(daemon, "slow")["live"] == 2, 60, "a second worker READY")
            started_at = watch.first_seen("slow", "slow-1 started on demand")
            # Past the cooldown, requests still wait (scale_up_queue or more per worker): only max_replicas stops a 3rd.
            status = wait_for(lambda: time.monotonic() > started_at + SCALE_UP_COOLDOWN_S + 0.5
                              and model_status(daemon, "slow"), 30, "the scale-up cooldown to pass")
            assert status["queued"] >= 2, "the burst must outlast the cooldown (make SLOW_TOKENS larger)"
            assert (status["desired"], status["live"], status["max_replicas"]) == (2, 2, 2)
        finally:
            for stream in burst:
                stream.cancel()
        for stream in burst:
            stream.join(60)
        status = wait_for(lambda: (s := model_status(daemon, "slow"))["desired"] == 1 and s, 30,
                          "back to min_replicas 1")
    assert watch.most_held["slow"] == 2, "never more than max_replicas"
    assert re.fullmatch(r"slow-[01] stopped: idle 1s", status["last_change"]), status["last_change"]
    assert status["live"] == 1 and status["min_replicas"] == 1
    assert metric(daemon, "mpsd_demand_loads_total", model="slow") == 1
    assert metric(daemon, "mpsd_demand_stops_total", model="slow", reason="idle") == 1
    assert demand_starts(daemon) == ["slow-1"]


def test_a_high_priority_model_is_evicted_last(make_daemon, tmp_path):
    # min_residency 0: every idle worker may go, so only priority, then recency, chooses (a young worker that may
    # not go yet is skipped, and the next in that order goes instead, whatever its priority).
    daemon = make_daemon(demand_config(tmp_path, 25, "0s", lm("a", priority=10), lm("b"), lm("c")))
    served = [served_by(daemon, name) for name in "abcbc"]
    assert served == ["a-0", "b-0", "c-0", "b-1", "c-1"]
    assert evictions(daemon) == [("b-0", "c"), ("c-0", "b"), ("b-1", "c")], \
        "a, used longest ago, stayed: lower priority goes first"
    assert served_by(daemon, "a") == "a-0"
    assert model_status(daemon, "a")["priority"] == 10
    assert metric(daemon, "mpsd_demand_stops_total", model="a", reason="evicted") == 0


def test_requests_alternating_faster_than_min_residency_do_not_evict(make_daemon, tmp_path):
    daemon = make_daemon(demand_config(tmp_path, 15, "4s", lm("a"), lm("b")))
    assert served_by(daemon, "a") == "a-0"
    pid = daemon.worker("a-0")["pid"]
    for _ in range(2):
        error = refused(daemon, "b", timeout=0.8)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert re.search(r"nothing evictable \(a-0 resident \ds < 4s\)$", error.details()), error.details()
        assert served_by(daemon, "a") == "a-0"
    a0 = worker_of(daemon, "a-0") or {}
    assert (a0.get("state"), a0.get("pid")) == ("READY", pid), "a-0 was not evicted"
    assert a0["state_age_s"] < 4, "the alternation ran inside a-0's min_residency"
    assert [metric(daemon, "mpsd_demand_loads_total", model=name) for name in "ab"] == [1, 1], \
        "one load each: the refused b-0 waits for room, no new load per request"

    # b-0 stays REFUSED, but no request waits for it now: a-0 past min_residency is not evicted for nobody.
    wait_for(lambda: (w := worker_of(daemon, "a-0")) is None or w["state"] != "READY" or w["state_age_s"] > 5, 30,
             "a-0 resident past min_residency")
    assert evictions(daemon) == [] and worker_states(daemon)["a-0"] == "READY", "a-0 evicted for nobody"
    assert served_by(daemon, "b", timeout=30) == "b-0", "a request that waits gets room, from the refused load"
    assert evictions(daemon) == [("a-0", "b")]
    assert metric(daemon, "mpsd_demand_loads_total", model="b") == 1


def test_a_model_whose_worker_cannot_boot_answers_its_waiting_requests_once_without_a_load_loop(make_daemon, tmp_path):
    empty = tmp_path / "no-model"  # a model directory without config.json: the worker exits with its boot-error code
    empty.mkdir()
    daemon = make_daemon(demand_config(tmp_path, 100, "0s", _table("broken", "torch-lm", {
        "path": str(empty), "min_replicas": 0, "max_replicas": 2, "threads": 1})))
    waiting = [Stream(daemon, 3, model="broken", timeout=60) for _ in range(2)]
    for stream in waiting:
        stream.join(60)
        assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE, stream.summary()
        assert stream.error.details().startswith(
            "model 'broken' has no live worker: broken-0 gave up: boot failure, not retried:"), stream.error.details()
    worker = daemon.worker("broken-0")
    assert worker["state"] == "FATAL" and "config.json" in worker["reason"], worker["reason"]

    later = refused(daemon, "broken", timeout=30)
    assert later.code() == grpc.StatusCode.UNAVAILABLE and "broken-0 gave up" in later.details()
    assert worker_states(daemon) == {"broken-0": "FATAL"}, "no second worker, though max_replicas allows one"
    assert metric(daemon, "mpsd_demand_loads_total", model="broken") == 1
    assert daemon.log().count(" spawned") == 1


BAD_DEMAND_KEYS = {  # what the file says below model a's name and backend -> what the refusal must say
    "min above max": ("min_replicas = 3\nmax_replicas = 2\nreplicas = 2",
                      r"models\[0\] \(a\)\.min_replicas: 3 is above max_replicas 2"),
    "replicas above max": ("replicas = 3\nmax_replicas = 2", r"models\[0\] \(a\)\.replicas: 3 is above max_replicas 2"),
    "replicas below min": ("replicas = 1\nmin_replicas = 2", r"models\[0\] \(a\)\.replicas: 1 is below min_replicas 2"),
    "keep_alive negative": ("keep_alive = -2",
                            r"models\[0\] \(a\)\.keep_alive: must be a duration like '5m', or -1 for never, got -2"),
    "scale_up_queue 0": ("scale_up_queue = 0", r"models\[0\] \(a\)\.scale_up_queue: must be an integer >= 1, got 0"),
    "unknown key": ("min_replica = 1", r"models\[0\]\.min_replica: unknown key"),
}
# With replicas unset it defaults to min_replicas: the refusal must still name the key the file sets.
MIN_ABOVE_MAX_ALONE = pytest.param(
    "min_replicas = 3\nmax_replicas = 2", r"models\[0\] \(a\)\.min_replicas: 3 is above max_replicas 2",
    id="min above max, replicas unset")
MODEL_A = '\n[[models]]\nname = "a"\nbackend = "null-lm"\n'  # the bad keys go below


@pytest.mark.parametrize("keys,message", [pytest.param(*case, id=name) for name, case in BAD_DEMAND_KEYS.items()]
                         + [MIN_ABOVE_MAX_ALONE])
def test_mpsd_serve_refuses_a_bad_demand_key_naming_it(tmp_path, keys, message):
    config = tmp_path / "mpsd.toml"
    config.write_text(MODEL_A + keys + "\n")
    result = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "serve", "--config", str(config), "--listen",
                             "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and re.search(message, result.stderr), result.stderr


MEASURED_NOW = ("shared_bytes", "shared_by")  # what the workers' pages are at this moment, not what was configured


def configured(status: dict) -> list[dict]:
    return [{k: v for k, v in model.items() if k not in MEASURED_NOW} for model in status["models"]]


def test_a_reload_with_a_bad_demand_key_is_refused_naming_it_and_leaves_the_fleet_as_it_was(make_daemon, tmp_path):
    daemon = make_daemon(MODEL_A + 'min_replicas = 1\nmax_replicas = 2\nfootprint = "1GiB"\n[[models]]\nname = "b"\n'
                                   'backend = "null-lm"\nmin_replicas = 0\nmax_replicas = 1\nfootprint = "1GiB"\n')
    daemon.wait_ready(1)
    before = daemon.status()
    good = daemon.config_path.read_text()
    for keys, message in BAD_DEMAND_KEYS.values():
        daemon.config_path.write_text(MODEL_A + keys + "\n")  # also drops model b: a reload that applied would show
        result = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir),
                                 "reload"], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and re.search(message, result.stderr), (keys, result.stdout, result.stderr)
    after = daemon.status()
    assert [(w["id"], w["pid"], w["state"]) for w in after["workers"]] == [
        (w["id"], w["pid"], w["state"]) for w in before["workers"]]
    assert configured(after) == configured(before)
    assert served_by(daemon, "a") == "a-0" and served_by(daemon, "b") == "b-0"
    daemon.config_path.write_text(good)
    result = subprocess.run([sys.executable, "-m", "mpsd.cli.mpsctl", "--state-dir", str(daemon.state_dir), "reload"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "no model changed" in result.stdout, result.stderr
