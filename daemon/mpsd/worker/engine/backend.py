"""The engine backend as the worker's gRPC service sees it: started and healthy at load, then a pass-through.

load() runs the engine's command with this replica's {port}, {path},
{state} and {replica}, and returns once its health path answers 200 within
start_timeout (a command that is not there, exits, or never answers on its
port is a boot failure naming the command and its last lines, so the model
goes FATAL instead of looping; an engine that exits saying its port was taken,
which another process can do between the pick and the bind, is started again
on another port, up to PORT_ATTEMPTS times). The engine batches by itself, so this stands
where the decode loop stands for mpsd's own backends: submit() and
submit_chat() turn one request into one streamed HTTP call, read on a thread
of its own that pushes its events to the daemon's stream. A thread watches
the engine: if it dies, the worker exits with the engine's last lines in its
stderr, and the daemon reads that death like any worker's (out of memory
included). Health keeps being checked on every Stats probe, so a hung engine
is killed as a hung worker is.
"""

from __future__ import annotations

import http.client
import os
import re
import sys
import threading
import time
from typing import Callable

from mpsd.chat_params import ChatParams
from mpsd.config.engines import fill_command
from mpsd.exitcodes import EXIT_BOOT_FAILURE
from mpsd.generate_params import GenerateParams
from mpsd.oom import find_oom_signature
from mpsd.worker.backends.base import BootFailure, MemoryReport
from mpsd.worker.engine.openai_client import EngineCall, EngineError, chat_body, completions_body
from mpsd.worker.engine.process import EngineProcess, EngineStartError, free_port, status_text, wait_until
from mpsd.worker.engine.prompt_count import PromptCounter
from mpsd.worker.prefix_store import PrefixCacheFigures
from mpsd.worker.sinks import EventSink, relay
from mpsd.worker_spec import WorkerSpec

DEFAULT_HEALTH_PATHS = ("/health", "/v1/models")
HEALTH_PROBE_TIMEOUT_S = 2.0
HEALTH_RECHECK_S = 2.0
ENGINE_EXIT_WAIT_S = 1.0
WORKER_EXIT_WAIT_S = 10.0
STOP_GRACE_S = 10.0
PORT_ATTEMPTS = 3  # a port free when picked can be taken before the engine binds it: a fresh one, not FATAL
# How engines say their port was taken: Python's OSError (mlx_lm.server, uvicorn), llama-server's words.
PORT_TAKEN = re.compile(r"address already in use|EADDRINUSE|couldn't bind HTTP server socket", re.IGNORECASE)
EXIT_ENGINE_GONE = 1  # the worker's exit code when its engine ended by itself with code 0 or 78 (reserved)


class EngineModel:
    """What WorkerService and the worker's main call: the decode loop's face, served by an external engine."""

    context_length = 0  # the engine's own; it refuses what does not fit
    kv_bytes = 0
    kv_reserve_bytes = 0
    weights_bytes = 0

    def __init__(self, spec: WorkerSpec, process: EngineProcess, port: int, health_path: str) -> None:
        self._spec = spec
        self.process = process
        self.port = port
        self.health_path = health_path
        self.device = f"engine {engine_name(process.argv)}"
        self._running = 0
        self._lock = threading.Lock()
        self._healthy_at = time.monotonic()
        self._prompts = PromptCounter(port)  # for engines whose streams carry no usage (llama-cpp-python)

    # -- the decode loop's face ---------------------------------------------

    @property
    def running(self) -> int:
        return self._running

    def submit(self, params: GenerateParams, deadline: float | None = None, sink: EventSink | None = None):
        return self._call(EngineCall(self.port, "/v1/completions", completions_body(params), deadline, chat=False,
                                     count_prompt=lambda: self._prompts.count(params.prompt)), sink)

    def submit_chat(self, chat: ChatParams, deadline: float | None = None, sink: EventSink | None = None):
        return self._call(EngineCall(self.port, "/v1/chat/completions", chat_body(chat), deadline, chat=True), sink)

    def _call(self, call: EngineCall, sink: EventSink | None):
        """Without a sink: the events, pulled by iterating. With one (the daemon's stream): a thread reads the
        engine's HTTP stream and pushes each event as it comes, as the decode loop pushes its steps'."""
        counted = _Counted(call, self._count, self._engine_ended)
        if sink is not None:
            threading.Thread(target=relay, args=(counted, sink), name="mpsd-engine-call", daemon=True).start()
        return counted

    def _engine_ended(self) -> bool:
        """Whether the engine has died (waiting a moment: a broken stream comes before the exit is seen)."""
        return wait_until(lambda: self.process.poll() is not None, ENGINE_EXIT_WAIT_S)

    def _count(self, delta: int) -> None:
        with self._lock:
            self._running += delta

    def set_prefix_cache_budget(self, budget: int) -> None:
        """The daemon sends every worker a budget; an engine keeps no mpsd prefix cache to apply it to."""

    @property
    def prefix_cache(self) -> PrefixCacheFigures:
        """None kept: the engine's own prompt cache is its business (it reports cached_tokens in usage)."""
        return PrefixCacheFigures()

    def stop(self) -> None:
        self.process.stop(STOP_GRACE_S)

    # -- health and memory ----------------------------------------------------

    def check_health(self) -> str:
        """'' while the engine runs and answers its health path; otherwise why not (the probe then fails).
        Asked at most every HEALTH_RECHECK_S: the daemon probes twice a second, the engine need not hear it all."""
        if self.process.poll() is not None:
            return f"engine {self.process.command} has ended"
        now = time.monotonic()
        if now - self._healthy_at < HEALTH_RECHECK_S:
            return ""
        status = probe(self.port, self.health_path, HEALTH_PROBE_TIMEOUT_S)
        if status != 200:
            return f"engine health {self.health_path} answered {status or 'nothing'} within {HEALTH_PROBE_TIMEOUT_S:g}s"
        self._healthy_at = now
        return ""

    def memory_report(self) -> MemoryReport:
        return MemoryReport({}, note=f"{self.device}: the daemon measures its process tree "
                                     f"(worker, engine pid {self.process.pid} and what it started)")


class _Counted:
    """An EngineCall counted as running while it is iterated, so Stats shows the requests in the engine.

    A stream the engine's death broke is not this request's failure: the worker
    is about to exit (the watch thread), and that death ends the stream the way a
    dead worker's does (UNAVAILABLE, retried elsewhere before its first token)."""

    def __init__(self, call: EngineCall, count: Callable[[int], None], engine_ended: Callable[[], bool]) -> None:
        self._call = call
        self._count = count
        self._engine_ended = engine_ended

    def cancel(self) -> None:
        self._call.cancel()

    def __iter__(self):
        self._count(1)
        try:
            yield from self._call
        except EngineError:
            if self._engine_ended():
                time.sleep(WORKER_EXIT_WAIT_S)  # the watch thread ends this process meanwhile
            raise
        finally:
            self._count(-1)


def engine_name(argv: list[str]) -> str:
    """What status calls the engine: the module of `python -m X`, else the program's file name."""
    if "-m" in argv[:-1]:
        return argv[argv.index("-m") + 1]
    return os.path.basename(argv[0])


CALLED_PATHS = ("POST /v1/completions", "POST /v1/chat/completions", "POST /extras/tokenize/count", "POST /tokenize")


def quiet_access_line(health_paths: tuple[str, ...]) -> Callable[[str], bool]:
    """Whether a line is the engine's access log of a call of the worker's own that succeeded (a health probe, a
    request, a prompt count): one a request would bury the lines that say why an engine died (the stderr tail the
    daemon classifies is 50 lines) and fill mpsd's log. Failed calls (any status but 200) are kept."""
    needles = tuple(f'{call} HTTP/1.1" 200' for call in (*(f"GET {path}" for path in health_paths), *CALLED_PATHS))
    return lambda line: any(needle in line for needle in needles)


def probe(port: int, path: str, timeout_s: float) -> int:
    """The HTTP status of GET path, 0 when nothing answered."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def load(spec: WorkerSpec, log: Callable[[str], None]) -> EngineModel:
    if not spec.engine_command:
        raise BootFailure("backend engine needs a command (engine_command in the spec)")
    paths = (spec.engine_health,) if spec.engine_health else DEFAULT_HEALTH_PATHS
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = free_port()
        argv = fill_command(tuple(spec.engine_command), port=port, path=spec.path, state=spec.engine_state_dir,
                            replica=spec.replica)
        process = EngineProcess(argv, cwd=spec.engine_state_dir or None, quiet=quiet_access_line(paths))
        log(f"starting engine on port {port}: {process.command}")
        try:
            process.start()
        except EngineStartError as exc:
            raise BootFailure(str(exc)) from None
        health = _wait_healthy(process, port, spec, last_try=attempt == PORT_ATTEMPTS)
        if health:
            break
        log(f"engine could not bind port {port}, taken since it was picked: trying another "
            f"({attempt} of {PORT_ATTEMPTS})")
    model = EngineModel(spec, process, port, health)
    log(f"engine pid {process.pid} healthy at http://127.0.0.1:{port}{health}")
    threading.Thread(target=_exit_with_engine, args=(process, log), name="engine-watch", daemon=True).start()
    return model


def _wait_healthy(process: EngineProcess, port: int, spec: WorkerSpec, *, last_try: bool = True) -> str:
    """The health path that answered 200; "" when the engine exited because its port was taken (not on the last
    try); a boot failure (or, for an engine that died of memory, a crash the daemon classifies as OOM) otherwise."""
    paths = (spec.engine_health,) if spec.engine_health else DEFAULT_HEALTH_PATHS
    answered: list[str] = []

    def healthy() -> bool:
        for path in paths:
            if probe(port, path, HEALTH_PROBE_TIMEOUT_S) == 200:
                answered.append(path)
                return True
        return False

    if wait_until(healthy, spec.engine_start_timeout_s, gave_up=lambda: process.poll() is not None):
        return answered[0]
    if process.poll() is not None:
        returncode = process.wait()
        if not last_try and PORT_TAKEN.search("\n".join(process.tail())):
            return ""
        _fail_start(process, f"engine exited before it was healthy ({status_text(returncode)})")
    process.stop(STOP_GRACE_S)
    _fail_start(process, f"engine never answered {' or '.join(paths)} on port {port} within "
                         f"start_timeout {spec.engine_start_timeout_s:g}s (is it listening on {{port}}?)")
    raise AssertionError("unreachable")


def _fail_start(process: EngineProcess, what: str) -> None:
    """A boot failure, unless the engine ran out of memory: that is not a bad config, and must not go FATAL."""
    reason = process.failure(what)
    if find_oom_signature(process.tail()):
        _log_line(f"engine ran out of memory while starting: {reason}")
        os._exit(EXIT_ENGINE_GONE)
    raise BootFailure(reason)


def _exit_with_engine(process: EngineProcess, log: Callable[[str], None]) -> None:
    """The worker lives as long as its engine: a dead engine means a dead worker, restarted by the daemon."""
    returncode = process.wait()
    if process.stopping.is_set():
        return
    log(process.failure(f"engine pid {process.pid} ended: {status_text(returncode)}"))
    if returncode < 0:
        code = 128 + -returncode
    else:
        code = EXIT_ENGINE_GONE if returncode in (0, EXIT_BOOT_FAILURE) else returncode
    os._exit(code)


def _log_line(message: str) -> None:
    sys.stderr.write(f"mpsd worker {os.getpid()}: {message}\n")
    sys.stderr.flush()

