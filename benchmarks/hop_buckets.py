"""`python -m benchmarks hop`'s buckets: which part of the hop a py-spy sample was spent in.

A raw stack ("thread (tid): name;outermost;...;innermost N") is read innermost
first, and the first frame that a rule matches decides, because the innermost
mpsd or library frame names the work better than the loop that called it.
threading.py frames (Condition, Event, Lock) are skipped and their caller
decides whose wait it was: a wait is a cost of the hand-off it serves, not of
threading. A few buckets need more than the innermost frame: whole threads
whose every sample is one job (the daemon's grpc.aio poller, the worker's
steps-in reader), a stack that runs inside the daemon's WorkerLink reader
task (whatever grpc or asyncio frame is innermost, it is that task's read or
fan-out), and the worker's Steps sender: the thread named mpsd-steps-out on
the socket transport, or, on the gRPC one, a grpc pool thread told apart only
by the WorkerService.Steps frame some of its samples show. py-spy often shows
an asyncio task's stack without its outer coroutines, so on a checkout with
the Steps stream every stream read from a worker counts as the WorkerLink
reader's (it is the only one). Rules that depend on the code (source lines,
which transport) read it from the checkout measured, so they follow the code.
The rules cover the three transports mpsd has had: per-request Generate
streams, Steps as a gRPC stream, and Steps on its own socket, so one command
reads any of those checkouts.
"""

from __future__ import annotations

import collections
import pathlib
import re

FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

IDLE = "idle (wait loops)"
DAEMON_IDLE = "idle (other threads' wait loops)"
HANDOFF = "queue hand-offs (SimpleQueue put/get, Condition/Event)"
DETOKENIZE = "detokenize (IncrementalDetokenizer.push / tokenizer decode)"
STOPS = "stop matching / SequenceStream.push"
SAMPLING = "sampling"
ADMISSION = "admission (_join: encode, engine.add)"
MODEL = "model step (engine.step: forward, torch/mlx)"
BOOKKEEPING = "scheduler bookkeeping (_step/_deliver/_let_go/_leave/loop)"
OUTBOX = "step outbox/encode (StepEvents construction)"
SENDER = "Steps sender (one send per step message: a socket frame, or a gRPC message)"
STEPS_IN = "steps-in reader thread"
PROTOBUF = "protobuf construction (GenerateResponse(...))"
HANDLER = "worker handler Python (server.py _stream/_run/Counters)"
POLL = "grpc sync server: poll thread (_serve / cq)"
SERIALIZE = "protobuf serialize (grpc _common.serialize)"
SEND = "grpc sync server: per-message send, Python/Cython"
SEND_WAIT = "grpc sync server: per-message send, Condition wait/wake"
# On the Steps sender's thread these are its per-message send, not a per-request handler's.
SENDER_OWNS = {SEND, SEND_WAIT, HANDLER, "threading waits (other)"}

LINK_READER = "WorkerLink reader (Steps read + fan-out to TokenStreams)"
LINK_WRITER = "WorkerLink writer (StepRequests out: requests, taken, cancels)"
WAKEUPS = "TokenStream wakeups (__anext__)"
SETUP = "per-request setup (routing, pool, call creation, parse)"
AIO_READ = "grpc.aio read from worker (stub stream iteration, deserialize)"
POLLER = "grpc.aio poller thread (C-core completion queue, no Python frame)"
EMPTY = "empty stack (py-spy read no Python frame)"
NO_PY_BUCKET = "grpc.aio Cython, no Python frame (server send to client, completion callbacks)"
MLX_STREAM = "model step: MLX CPU stream thread (native, no Python frame)"

STEPS_OUT_THREAD = "mpsd-steps-out"  # the thread that sends a Steps connection's frames (worker/step_socket.py)
STEPS_IN_THREAD = "mpsd-steps-in"  # worker/server.py names the thread that reads the daemon's Steps requests
LINK = "mpsd/supervisor/fleet/worker_link.py"
THREAD_START = ("Thread.run", "Thread._bootstrap_inner", "Thread._bootstrap")  # every thread's outer frames
# A daemon stack holding one of these frames is that task's work, whatever is innermost (grpc, asyncio).
DAEMON_TASKS = {"_Connection._read": LINK_READER, "_Connection._run": LINK_READER,
                "_Connection._requests": LINK_WRITER, "_Connection.send": LINK_WRITER}


def f(file_part=None, funcs=None, func_part=None, lines=None):
    """A rule: the frame's file contains file_part, its function is one of funcs or contains func_part, and its
    line is one of lines; each only where given."""
    def match(func: str, file: str, line: int) -> bool:
        return ((file_part is None or file_part in file) and (funcs is None or func in funcs)
                and (func_part is None or func_part in func) and (lines is None or line in lines))
    return match


def source_lines(root: pathlib.Path, rel: str, needles: tuple[str, ...]) -> set[int]:
    """1-based numbers of the lines of root/rel holding any needle (none when the file is gone)."""
    path = root / rel
    if not path.is_file():
        return set()
    return {i for i, text in enumerate(path.read_text().splitlines(), 1) if any(n in text for n in needles)}


def _flat(*groups) -> list:
    return [(bucket, match) for bucket, *matches in groups for match in matches]


class Rules:
    """The worker's and the daemon's rule lists, in the order they are tried on each frame."""

    def __init__(self, root: pathlib.Path) -> None:
        scheduler, server = "daemon/mpsd/worker/scheduler.py", "daemon/mpsd/worker/server.py"
        handoffs = source_lines(root, scheduler, ("events.put(", "events.get("))
        protobuf = source_lines(root, server, ("GenerateResponse(", "inference_pb2.Finish(", "inference_pb2.Usage("))
        # With the Steps transport a daemon's only stream read from a worker is its Steps stream, whose reads
        # py-spy often shows without the task's outer frames (so without _Connection._read).
        steps = (root / "daemon" / LINK).is_file()
        backends = "mpsd/worker/backends/"
        self.worker = _flat(
            (IDLE, f("concurrent/futures/thread.py", {"_worker"}), f("mpsd/worker/__main__.py"),
             f("mpsd/worker/watchdog.py")),
            (DETOKENIZE, f("mpsd/worker/backends/text.py", func_part="IncrementalDetokenizer"), f("tokenizers"),
             f("tokenization_utils"), f(backends, func_part=".decode"), f("mlx_lm/tokenizer_utils")),
            (STOPS, f("mpsd/worker/backends/text.py"), f("mpsd/worker/backends/streaming.py")),
            (SAMPLING, f("mpsd/worker/backends/sampling.py"),
             f("mpsd/worker/backends/torch_lm.py", {"TorchCausalLM._sample"}),
             f("mpsd/worker/backends/mlx_lm.py", func_part="_make_sampler"), f("mlx_lm/sample_utils")),
            (ADMISSION, f("mpsd/worker/scheduler.py", {"DecodeScheduler._join"}),
             f(backends, {"TorchCausalLM.encode", "MlxCausalLM.encode", "NullLM.encode", "TorchCausalLM.add",
                          "MlxCausalLM.add", "NullLM.add"})),
            (MODEL, f(backends, func_part=".step"), f("mpsd/worker/backends/torch_lm.py"),
             f("mpsd/worker/backends/torch_batch.py"), f("mpsd/worker/backends/mlx_lm.py"), f("torch/"),
             f("transformers/"), f("mlx_lm/"), f("mlx/")),
            (HANDOFF, f("mpsd/worker/scheduler.py", lines=handoffs),
             f("mpsd/worker/scheduler.py", {"Submission.__iter__", "Submission.cancel", "DecodeScheduler.submit",
                                            "DecodeScheduler._wake"})),
            (BOOKKEEPING, f("mpsd/worker/scheduler.py"), f("mpsd/worker/prefix_store.py")),
            (OUTBOX, f("mpsd/worker/step_outbox.py"), f("mpsd/worker/sinks.py")),
            (SENDER, f("mpsd/worker/step_session.py")),
            (PROTOBUF, f("mpsd/worker/server.py", lines=protobuf)),
            (HANDLER, f("mpsd/worker/server.py"), f("mpsd/generate_params.py")),
            (POLL, f("grpc/_server.py", {"_serve"})),
            (SERIALIZE, f("grpc/_common.py", func_part="serialize")),
            (SEND, f("grpc/_server.py"), f("grpc/")),
            (HANDOFF, f("queue.py")),
        )
        inference = "mpsd/supervisor/edge/inference.py"
        self.daemon = _flat(
            (WAKEUPS, f(LINK, {"TokenStream.__anext__"})),
            (SETUP, f(LINK)),
            ("memory probes (smaps_rollup, psutil)", f("mpsd/supervisor/memory/"), f("psutil/")),
            ("status/health/fleet (Stats probes, snapshot, admin)", f("mpsd/supervisor/fleet/"),
             f("mpsd/supervisor/edge/admin.py"), f("mpsd/supervisor/daemon.py")),
            ("metrics (RequestTimer.token etc., prometheus_client)", f("mpsd/supervisor/edge/metrics.py"),
             f("prometheus_client/")),
            (LINK_READER if steps else AIO_READ, f("grpc/aio/_call.py", func_part="_StreamResponseMixin"),
             f("grpc/_common.py", func_part="deserialize")),
            (LINK_WRITER, f("grpc/aio/_call.py", func_part="_StreamRequestMixin")),  # no stream-request call before
            (AIO_READ, f("grpc/aio/_call.py")),
            (SETUP, f("mpsd/supervisor/routing/"), f("grpc/aio/_channel.py"), f("grpc/aio/_interceptor.py"),
             f("mpsd/generate_params.py"), f("mpsd/chat_params.py"),
             f(inference, {"InferenceService._pool_for", "InferenceService._acquire", "InferenceService._call",
                           "_tolerant.<locals>.deserialize", "InferenceService._model_label",
                           "InferenceService._model_name", "_ended_with"}),
             f("contextlib.py")),
            ("InferenceService stream/_generate/_forward_stream Python", f(inference)),
            ("grpc.aio server/other Python (grpc/aio/_server.py, _base_*)", f("grpc/aio/")),
            ("grpc other Python (grpc/_*.py)", f("grpc/")),
            ("logging", f("logging/")),
            (DAEMON_IDLE, f("asyncio/unix_events.py")),
            (NO_PY_BUCKET, f("asyncio/events.py", {"Handle._run"})),
            ("asyncio event loop: select/epoll", f("selectors.py")),
            ("asyncio event loop: _run_once / futures / tasks", f("asyncio/")),
            (DAEMON_IDLE, f("concurrent/futures/thread.py")),
        )

    def classify(self, process: str, thread: str, frames: list[tuple[str, str, int]], sender: bool = False) -> str:
        """sender: the sample is of the worker thread that answers the Steps stream."""
        if process == "daemon" and "_poll_wrapper" in thread:
            return POLLER
        if process == "worker" and thread == STEPS_IN_THREAD:
            return STEPS_IN
        if process == "daemon":
            for func, file, _ in frames:
                if func in DAEMON_TASKS and file.endswith(LINK):
                    return DAEMON_TASKS[func]
        if not frames:
            return EMPTY
        bucket = self._innermost(process, frames)
        return SENDER if sender and bucket in SENDER_OWNS else bucket

    def _innermost(self, process: str, frames: list[tuple[str, str, int]]) -> str:
        rules = self.worker if process == "worker" else self.daemon
        waiting = False
        for func, file, line in reversed(frames):
            if (file.endswith("/threading.py") or file == "threading.py") and func not in THREAD_START:
                waiting = True
                continue
            if waiting and process == "worker":
                if "grpc/" in file:
                    return SEND_WAIT
                if "scheduler.py" in file and func == "DecodeScheduler._decode_until_stopped":
                    return IDLE  # the decode loop waits only when it has no sequence and no request
                if "mpsd/worker/__main__.py" in file or "watchdog.py" in file:
                    return IDLE
                if "scheduler.py" in file or "step_outbox.py" in file:
                    return HANDOFF
            for bucket, match in rules:
                if match(func, file, line):
                    return bucket
        return "threading waits (other)" if waiting else "other"


def parse_raw(path: pathlib.Path):
    """Yields (tid, thread name, frames outermost first, count) from a py-spy raw file recorded with --threads."""
    for row in path.read_text(errors="replace").splitlines():
        stack, _, count = row.strip().rpartition(" ")
        if not stack:
            continue
        parts = stack.split(";")
        thread, tid = "", 0
        if parts[0].startswith("thread ("):
            head = parts.pop(0)
            thread = head.split("): ", 1)[1] if "): " in head else head
            tid_text = head[len("thread ("):].split(")", 1)[0]
            tid = int(tid_text, 16) if tid_text.startswith("0x") else int(tid_text)
        frames = []
        for part in parts:
            m = FRAME.match(part)
            frames.append((m["func"], m["file"], int(m["line"] or 0)) if m else (part, "", 0))
        yield tid, thread, frames, int(count)


def bucketize(rules: Rules, process: str, path: pathlib.Path) -> dict:
    rows = list(parse_raw(path))
    senders = {tid for tid, thread, frames, _ in rows if process == "worker"
               and (thread == STEPS_OUT_THREAD
                    or any(func in ("WorkerService.Steps", "WorkerService.serve_steps") for func, _, _ in frames))}
    counts: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    tops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    per_tid: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    names: dict[int, str] = {}
    for tid, thread, frames, n in rows:
        bucket = rules.classify(process, thread, frames, sender=tid in senders)
        counts[bucket] += n
        per_tid[tid][bucket] += n
        names[tid] = thread
        threads[re.sub(r"_\d+$", "_N", thread)] += n
        tops[bucket][" <- ".join(f"{fn} ({fi.rsplit('/', 2)[-1]}:{ln})" for fn, fi, ln in frames[::-1][:3])] += n
    total = sum(counts.values())
    idle = sum(v for k, v in counts.items() if k.startswith("idle"))
    busy = max(1, total - idle)
    return {
        "samples": total,
        "idle_samples": idle,
        "busy_samples": total - idle,
        "buckets": dict(counts.most_common()),
        "percent_of_busy": {k: round(100 * v / busy, 1) for k, v in counts.most_common() if not k.startswith("idle")},
        "threads": dict(threads.most_common()),
        "top_frames": {k: tops[k].most_common(6) for k in counts},
        "tid_names": {str(t): n for t, n in names.items()},
        "tid_buckets": {str(t): dict(c) for t, c in per_tid.items()},
    }


def thread_group(name: str, comm: str, backend: str = "") -> str:
    """A thread's group: its Python name with pool numbers folded, else its OS name (grpc's native threads)."""
    if name:
        if name.startswith("ThreadPoolExecutor-"):
            return "ThreadPoolExecutor-*_N (grpc handler pool)"
        return re.sub(r"_\d+$", "_N", name)
    if comm.startswith(("event_engine", "grpc_global_tim", "lifeguard", "default-executo", "resolver-execut")):
        return f"grpc C-core native: {comm}"
    if backend == "mlx-lm" and comm == "python":
        return "MLX CPU stream thread (native)"  # mlx runs a CPU stream's ops on a std::thread of its own
    return f"native/unsampled: {comm}"


def cpu_weighted(profile: dict, threads_cpu: dict, backend: str) -> dict:
    """Each thread's /proc CPU (profile phase) split over buckets in proportion to its py-spy samples, because
    py-spy also samples threads that are runnable but waiting for a core; a thread with no sample (grpc's
    C-core threads, MLX's stream thread: no Python frame) counts whole under its group."""
    names = profile.get("tid_names", {})
    weighted: collections.Counter = collections.Counter()
    groups: collections.Counter = collections.Counter()
    for tid, (comm, cpu, *_rest) in threads_cpu.items():
        buckets = profile.get("tid_buckets", {}).get(str(tid))
        group = thread_group(names.get(str(tid), ""), comm, backend)
        groups[group] += cpu
        if buckets:
            n = sum(buckets.values())
            for bucket, count in buckets.items():
                weighted[bucket] += cpu * count / n
        elif cpu > 0:
            weighted[MLX_STREAM if group.startswith("MLX") else group if group.startswith("grpc C-core")
                     else f"{group} (no py-spy samples)"] += cpu
    total = sum(weighted.values()) or 1.0
    return {"cpu_s": round(total, 3),
            "percent_of_cpu": {k: round(100 * v / total, 1) for k, v in weighted.most_common() if v > 0},
            "cpu_s_by_thread_group": {k: round(v, 3) for k, v in groups.most_common() if v > 0}}
