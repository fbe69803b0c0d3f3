"""`python -m benchmarks engines`: an external engine through mpsd (`backend = "engine"`) against the same engine
called directly, at 1 and 8 concurrent streams, and 2 replicas against 1.

For each engine, one group of systems, all up at once, each running the same engine command on the same model:

* **direct**: the engine started by itself (ServerProcess), called over its OpenAI `/v1/completions` stream;
* **mpsd-http** / **mpsd-grpc**: mpsd with that engine as its one worker, called through mpsd's OpenAI HTTP API
  (the very client code of direct, the same request body: the hop is the only difference) and through mpsd's gRPC
  Generate;
* **mpsd-2x-http** / **mpsd-2x-grpc**: mpsd with 2 replicas of it.

Engines: mlx_lm.server on the MLX model (mlx-lm installed), and what mpsd runs for a GGUF (llama-server on PATH,
else llama-cpp-python's server: the llama-cpp extra) on the torch model converted to GGUF (`--model demo`:
'@gguf-demo'). An engine that is not installed is recorded as skipped, with why.

Load: fixed prompts (stream i sends PROMPTS[i % 8]), greedy, max_tokens tokens, streamed with usage. A cell is
N streams at once, each sending `requests` requests one after another; tokens are the usage's completion tokens.
Every system is warmed first (every stream level, every replica); then `rounds` rounds, each running every level
on every system in an order rotated by the round, so the machine's drift hits all alike. Per system and level:
TTFT p50/p99 (all rounds' requests), tok/s (completion tokens over the cell's wall time; the median round and every
round), per-stream tok/s (median over requests of a request's decode rate: tokens after the first over the time
after its first token), the ratio to direct (the median over rounds of tok/s against direct's in the same round),
and the CPU the cell cost per 1,000 tokens in each process role (engine, mpsd worker, mpsd daemon, this client).
The report and targets are engines_report.py; results.json and results.md go to --out
(default benchmarks/results/engines).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.metadata
import importlib.util
import dataclasses
import json
import pathlib
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import psutil

from benchmarks import engines_report, http_streams, interference
from benchmarks.daemon_run import RunningDaemon
from benchmarks.models import BenchModel
from benchmarks.peer_install import PEERS_DIR, PeerError
from benchmarks.servers import ServerProcess
from benchmarks.settings import cores, worker_threads
from benchmarks.timing import percentiles_ms

Progress = Callable[[str], None]
MODEL = "bench"
STAGGER_S = 0.001
LOG_DIR = PEERS_DIR / "engines"
ENGINES = ("mlx", "llama-cpp")
MLX_PROMPT_CONCURRENCY = 8    # mlx_lm.server's default
MLX_PREFILL_STEP_SIZE = 2048  # its default

PROMPTS = (
    "The module provides a way to",
    "In the first chapter of the book, the author",
    "A function that returns the sum of two numbers is",
    "The weather in the mountains was",
    "To install the package, run the command",
    "Once upon a time, in a small village,",
    "The main difference between a list and a tuple is",
    "When the server starts, it reads the configuration and",
)


@dataclasses.dataclass(frozen=True)
class Sizes:
    levels: tuple[int, ...] = (1, 8)     # concurrent streams per cell
    max_tokens: int = 64
    rounds: int = 4
    requests_1: int = 12                 # requests per stream, one after another, in a 1-stream cell
    requests_n: int = 6                  # in a cell of more streams
    warm_tokens: int = 8
    replicas_2x: bool = True             # the 2-replica daemon
    jitter_ms: float = 0.0               # a pause of 0 to this before each request (seeded: alike for every system)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(rounds=2, requests_1=6, requests_n=2)

    @classmethod
    def tiny(cls) -> Sizes:
        """The smoke test's: every system, one round, one stream, a few tokens."""
        return cls(levels=(1,), max_tokens=4, rounds=1, requests_1=2, requests_n=1, warm_tokens=2)

    def requests(self, streams: int) -> int:
        return self.requests_1 if streams == 1 else self.requests_n


# -- one engine ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Engine:
    key: str                      # the results' group: "mlx", "llama-cpp"
    name: str                     # what the report calls it: "mlx_lm.server 0.32.2"
    command: tuple[str, ...]      # mpsd's engine command, with {port} and {path}
    path: str                     # the model, the same file or directory for every system
    env: dict[str, str]
    concurrency: int              # the mpsd model's: what mpsd itself gives this engine
    health: str = ""              # the direct server's health path ("" : /health)
    note: str = ""


def mlx_engine(model: BenchModel, concurrency: int) -> Engine | str:
    """mlx_lm.server at its best here: a batch as wide as the streams can get (--decode-concurrency), every prompt
    of a burst prefilled together (--prompt-concurrency 8, its default), no per-request log lines."""
    if not model.mlx_dir:
        return "mlx-lm is not installed (the mlx extra)"
    threads = str(worker_threads(1, cores()))
    command = (sys.executable, "-m", "mlx_lm", "server", "--model", "{path}", "--port", "{port}", "--log-level",
               "WARNING", "--decode-concurrency", str(concurrency), "--prompt-concurrency",
               str(MLX_PROMPT_CONCURRENCY), "--prefill-step-size", str(MLX_PREFILL_STEP_SIZE))
    return Engine("mlx", f"mlx_lm.server {importlib.metadata.version('mlx-lm')}", command, model.mlx_dir,
                  {"OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}, concurrency,
                  note=f"mpsd concurrency = {concurrency} (the engine's batch)")


def llama_cpp_engine(model: BenchModel, progress: Progress) -> Engine | str:
    """What mpsd runs for a GGUF (mpsd.config.engines.llama_cpp_command) with the threads mpsd gives one worker and
    the model's context (mpsd's command for llama-cpp-python's server already has --interrupt_requests False,
    which the direct 8-stream cells need too: without it each request arriving ends the running one early)."""
    from mpsd.config.engines import llama_cpp_command

    command, concurrency = llama_cpp_command()
    if command[0] == sys.executable:
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (the llama-cpp extra: ./dev llama-cpp)"
        name = f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')} server"
    else:
        name = f"llama-server ({command[0]})"
    try:
        path = str(gguf_path(model, progress))
    except (PeerError, subprocess.SubprocessError, OSError) as exc:
        return f"the GGUF model could not be built: {exc}"
    threads = str(worker_threads(1, cores()))
    context = str(_context_length(model.torch_dir))
    if command[0] == sys.executable:
        extra = ("--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", context)
    else:
        extra = ("--threads", threads, "--ctx-size", str(int(context) * concurrency))
    return Engine("llama-cpp", name, (*command, *extra), path, {"OMP_NUM_THREADS": threads}, concurrency,
                  health="/v1/models", note=f"mpsd concurrency = {concurrency} (what mpsd picks for a GGUF)")


def gguf_path(model: BenchModel, progress: Progress) -> pathlib.Path:
    """The demo: '@gguf-demo' (built on first use as mpsd builds it); another model: converted once (as multi_turn's
    llama-cpp-python peer does)."""
    if model.name != "demo":
        from benchmarks.multi_turn_peers import gguf_file

        return gguf_file(model.torch_dir, progress)
    from mpsd.demo import GGUF_DEMO, resolve_demo_ref

    if not GGUF_DEMO.is_complete(GGUF_DEMO.model_dir()):
        progress("building the GGUF demo model (first use)")
        subprocess.run([sys.executable, "-m", "mpsd.cli.mpsd_cmd", "build-demo", "--gguf"], check=True,
                       timeout=900, stdin=subprocess.DEVNULL)
    return pathlib.Path(resolve_demo_ref(GGUF_DEMO.ref))


def _context_length(model_dir: str) -> int:
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    return int(next((config[k] for k in ("max_position_embeddings", "n_positions", "n_ctx") if k in config), 2048))


def mpsd_config(engine: Engine, replicas: int) -> str:
    command = ", ".join(json.dumps(part) for part in engine.command)
    env = ", ".join(f"{k} = {json.dumps(v)}" for k, v in engine.env.items())
    health = f"health = {json.dumps(engine.health)}\n" if engine.health else ""
    return f"""
[daemon]
drain_grace = "5s"
[[models]]
name = "{MODEL}"
backend = "engine"
path = {json.dumps(engine.path)}
command = [{command}]
{health}replicas = {replicas}
concurrency = {engine.concurrency}
queue = 256
start_timeout = "120s"
env = {{ {env} }}
"""


# -- the systems --------------------------------------------------------------------------------------------------


class GrpcStream:
    """One streamed Generate through mpsd's gRPC API, sent at once; yields once per token message, its token count
    the Finish's usage (as the HTTP systems' is their usage)."""

    def __init__(self, stub, prompt: str, max_tokens: int) -> None:
        from mpsd.v1 import inference_pb2

        self.reported_tokens: int | None = None
        self._call = stub.Generate(inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                                                 temperature=0), timeout=600)

    def __iter__(self) -> Iterator[object]:
        for message in self._call:
            if message.HasField("finish"):
                self.reported_tokens = message.finish.usage.completion_tokens
            else:
                yield message


@dataclasses.dataclass
class System:
    name: str
    kind: str          # "direct" | "mpsd"
    api: str           # "http" | "grpc"
    replicas: int
    start: Callable[[str, int], Iterator[object]]   # (prompt, max_tokens) -> a stream, sent now
    roots: Callable[[], dict[int, str]]             # pid -> role of every process serving it
    info: dict = dataclasses.field(default_factory=dict)
    daemon: RunningDaemon | None = None

    def served_by(self) -> dict[str, int]:
        """mpsd's workers and the requests each served (the daemon's, so its HTTP and gRPC systems' together)."""
        if self.daemon is None:
            return {}
        return {w["id"]: int(w.get("requests", 0)) for w in self.daemon.status()["workers"]}


def http_start(port: int) -> Callable[[str, int], Iterator[object]]:
    return lambda prompt, max_tokens: http_streams.CompletionStream(port, prompt, max_tokens)


def grpc_start(daemon: RunningDaemon) -> Callable[[str, int], Iterator[object]]:
    return lambda prompt, max_tokens: GrpcStream(daemon.inference, prompt, max_tokens)


def direct_roles(pid: int) -> Callable[[], dict[int, str]]:
    def roles() -> dict[int, str]:
        found = {pid: "engine"}
        with contextlib.suppress(psutil.Error):
            found.update({p.pid: "engine" for p in psutil.Process(pid).children(recursive=True)})
        return found
    return roles


def mpsd_roles(daemon: RunningDaemon) -> Callable[[], dict[int, str]]:
    """The daemon, its workers (its children), and what they started (the engine, its guard)."""
    def roles() -> dict[int, str]:
        found = {daemon.process.pid: "daemon"}
        with contextlib.suppress(psutil.Error):
            for worker in psutil.Process(daemon.process.pid).children():
                found[worker.pid] = "worker"
                with contextlib.suppress(psutil.Error):
                    found.update({p.pid: "engine" for p in worker.children(recursive=True)})
        return found
    return roles


@contextlib.contextmanager
def started(engine: Engine, sizes: Sizes, progress: Progress) -> Iterator[list[System]]:
    """Every system of one engine, up at once (the daemons' engines boot while the direct one does)."""
    with contextlib.ExitStack() as stack:
        daemons: dict[int, RunningDaemon] = {}
        for replicas in (1, 2) if sizes.replicas_2x else (1,):
            progress(f"{engine.key}: mpsd with {replicas} replica(s) of {engine.name}")
            daemon = RunningDaemon(mpsd_config(engine, replicas), http=True)
            stack.callback(daemon.stop)
            daemons[replicas] = daemon
        progress(f"{engine.key}: {engine.name} directly: {' '.join(engine.command[1:])}")
        command = [part.replace("{path}", engine.path).replace("{replica}", "0").replace("{state}", "{temp_dir}")
                   for part in engine.command]
        server = ServerProcess(f"{engine.key}-direct", command, LOG_DIR / f"{engine.key}-direct.log", engine.env,
                               health_path=engine.health or "/health", start_timeout_s=120)
        stack.callback(server.stop)
        systems = [System("direct", "direct", "http", 1, http_start(server.port), direct_roles(server.process.pid),
                          {"start_to_ready_s": round(server.start_to_ready_s, 2)})]
        for replicas, daemon in daemons.items():
            began = time.perf_counter()
            daemon.wait_ready(replicas, timeout=180)
            prefix = "mpsd" if replicas == 1 else f"mpsd-{replicas}x"
            info = {"ready_after_direct_s": round(time.perf_counter() - began, 2)}
            systems.append(System(f"{prefix}-http", "mpsd", "http", replicas, http_start(daemon.http_port),
                                  mpsd_roles(daemon), info, daemon))
            systems.append(System(f"{prefix}-grpc", "mpsd", "grpc", replicas, grpc_start(daemon), mpsd_roles(daemon),
                                  info, daemon))
        yield systems


# -- a cell -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    sent_at: float
    ttft_s: float = 0.0
    total_s: float = 0.0
    tokens: int = 0
    error: str = ""


def one_request(system: System, prompt: str, max_tokens: int) -> Request:
    request = Request(time.perf_counter())
    try:
        stream = system.start(prompt, max_tokens)
        events = 0
        for _ in stream:
            if events == 0:
                request.ttft_s = time.perf_counter() - request.sent_at
            events += 1
        request.total_s = time.perf_counter() - request.sent_at
        reported = getattr(stream, "reported_tokens", None)
        request.tokens = reported if reported is not None else events
        if events == 0:
            request.error = "no text streamed"
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure of the cell
        request.error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    return request


def cpu_seconds(roles: dict[int, str]) -> dict[int, tuple[str, float]]:
    found = {}
    for pid, role in roles.items():
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(pid).cpu_times()
            found[pid] = (role, times.user + times.system)
    return found


def run_cell(system: System, streams: int, requests: int, max_tokens: int, jitter_ms: float = 0.0) -> dict:
    """streams at once, each sending `requests` requests one after another (stream i: PROMPTS[i % 8])."""
    roles = system.roots()
    me = psutil.Process()
    cpu_before, client_before = cpu_seconds(roles), sum(me.cpu_times()[:2])
    machine_before = interference.snapshot()
    began = time.perf_counter()

    def stream(index: int) -> list[Request]:
        time.sleep(index * STAGGER_S)
        pauses = random.Random(index)  # the same pauses for every system and round
        done = []
        for _ in range(requests):
            time.sleep(pauses.uniform(0, jitter_ms) / 1000)
            done.append(one_request(system, PROMPTS[index % len(PROMPTS)], max_tokens))
        return done

    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        done = [r for future in [pool.submit(stream, i) for i in range(streams)] for r in future.result()]
    wall = time.perf_counter() - began
    others = interference.others_cores(machine_before, interference.snapshot())
    cpu_after, client_after = cpu_seconds(roles), sum(me.cpu_times()[:2])
    cpu = {"client": client_after - client_before}
    for pid, (role, seconds) in cpu_after.items():
        cpu[role] = cpu.get(role, 0.0) + seconds - cpu_before.get(pid, (role, seconds))[1]
    ok = [r for r in done if not r.error]
    return {"streams": streams, "wall_s": wall, "tokens": sum(r.tokens for r in ok),
            "ttft_s": [r.ttft_s for r in ok], "decode_tps": [(r.tokens - 1) / (r.total_s - r.ttft_s) for r in ok
                                                            if r.tokens > 1 and r.total_s > r.ttft_s],
            "token_counts": [r.tokens for r in ok], "requests": len(done), "failures": [r.error for r in done
                                                                                       if r.error],
            "cpu_s": cpu, "others_cores": others}


def warm(system: System, sizes: Sizes) -> None:
    """Every level (the widest reaches both replicas), short; then one whole request."""
    for streams in sorted(set(sizes.levels) | {max(sizes.levels)}, reverse=True):
        run_cell(system, streams, 1, sizes.warm_tokens)
    run_cell(system, 1, 1, sizes.max_tokens)


def measure_group(engine: Engine, sizes: Sizes, progress: Progress) -> dict:
    """Every system of the engine, warmed, then rounds of every level in a rotated order."""
    with started(engine, sizes, progress) as systems:
        for system in systems:
            warm(system, sizes)
        progress(f"{engine.key}: warmed {', '.join(s.name for s in systems)}")
        cells: dict[str, dict[int, list[dict]]] = {s.name: {n: [] for n in sizes.levels} for s in systems}
        for round_index in range(sizes.rounds):
            for level_index, streams in enumerate(sizes.levels):
                shift = (round_index + level_index) % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    cells[system.name][streams].append(run_cell(system, streams, sizes.requests(streams),
                                                                sizes.max_tokens, sizes.jitter_ms))
            progress(f"{engine.key}: round {round_index + 1}/{sizes.rounds}: " + ", ".join(
                f"{s.name} {cells[s.name][n][-1]['tokens'] / cells[s.name][n][-1]['wall_s']:.0f}"
                for n in sizes.levels for s in systems) + " tok/s")
        result = {"engine": engine.name, "command": list(engine.command), "path": engine.path, "env": engine.env,
                  "note": engine.note, "systems": {}}
        for system in systems:
            served = {"requests_by_worker": system.served_by()} if system.daemon else {}
            result["systems"][system.name] = {"kind": system.kind, "api": system.api, "replicas": system.replicas,
                                              **system.info, **served, "levels": {
                                                  str(n): summarize(cells[system.name][n], cells["direct"][n])
                                                  for n in sizes.levels}}
    return result


def summarize(cells: list[dict], direct: list[dict]) -> dict:
    """One system at one level over every round; ratios paired round by round with direct's cell."""
    tps = [c["tokens"] / c["wall_s"] for c in cells]
    direct_tps = [c["tokens"] / c["wall_s"] for c in direct]
    ttft = [t for c in cells for t in c["ttft_s"]]
    direct_ttft = [t for c in direct for t in c["ttft_s"]]
    tokens = sum(c["tokens"] for c in cells)
    roles = sorted({role for c in cells for role in c["cpu_s"]})
    counts = [n for c in cells for n in c["token_counts"]] or [0]
    failures = [f for c in cells for f in c["failures"]]
    decode = [x for c in cells for x in c["decode_tps"]]
    return {
        "requests": sum(c["requests"] for c in cells), "failures": len(failures), "failure_examples": failures[:3],
        "tokens_per_request": [min(counts), max(counts)],
        "ttft_ms": percentiles_ms(ttft),
        "tps": round(statistics.median(tps), 1) if tps else 0.0, "tps_rounds": [round(x, 1) for x in tps],
        "per_stream_tps": round(statistics.median(decode), 1) if decode else 0.0,
        "ratio_tps": round(statistics.median(a / b for a, b in zip(tps, direct_tps) if b), 3) if tps else None,
        "ratio_ttft_p50": (round(statistics.median(ttft) / statistics.median(direct_ttft), 3)
                           if ttft and direct_ttft and statistics.median(direct_ttft) else None),
        "cpu_ms_per_1k_tokens": {role: round(1e6 * sum(c["cpu_s"].get(role, 0.0) for c in cells) / tokens, 1)
                                 if tokens else 0.0 for role in roles},
        "others_cores": max((c["others_cores"] for c in cells if c["others_cores"] is not None), default=None),
    }


# -- the run ------------------------------------------------------------------------------------------------------


def run(sizes: Sizes, model: BenchModel, progress: Progress, out: pathlib.Path, engines: tuple[str, ...],
        command: str = "") -> dict:
    started_at = time.perf_counter()
    results: dict = {"command": command, "sizes": dataclasses.asdict(sizes),
                     "machine": {"cores": cores(), "python": platform.python_version(),
                                 "platform": platform.platform()},
                     "model": {"name": model.name, "torch_dir": model.torch_dir, "mlx_dir": model.mlx_dir},
                     "prompts": list(PROMPTS), "engines": {}}
    makers = {"mlx": lambda: mlx_engine(model, max(sizes.levels + (8,))),
              "llama-cpp": lambda: llama_cpp_engine(model, progress)}
    for key in engines:
        try:
            engine = makers[key]()
        except Exception as exc:  # noqa: BLE001 - an engine that cannot be set up is a figure, not the end of the run
            engine = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
        if isinstance(engine, str):
            results["engines"][key] = {"error": f"skipped: {engine}"}
            progress(f"{key}: skipped: {engine}")
            continue
        try:
            results["engines"][key] = measure_group(engine, sizes, progress)
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
            results["engines"][key] = {"engine": engine.name, "error": error}
            progress(f"{key}: failed: {error}")
    results["targets"] = engines_report.targets(results)
    results["elapsed_s"] = round(time.perf_counter() - started_at, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(engines_report.markdown(results))
    return results
