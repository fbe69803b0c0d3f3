"""mpsd's mlx-lm workers against mlx_lm.server, on the same MLX model, streams and machine.

mlx_lm.server (mlx-lm's own OpenAI-compatible server, from this venv) batches
continuously with the same BatchGenerator mpsd's mlx-lm engine uses; it is
one process with one model, so it has one row. Its settings: decode
concurrency = mpsd's concurrency (the same batch), prompt concurrency 8 and
prefill step 2048 (its defaults), greedy, streamed with one SSE event per
token. MLX on a Linux CPU runs on its reference-BLAS CPU backend, where a
batch costs about as much per token as one stream, so these cells are short.
"""

from __future__ import annotations

import sys
from typing import Callable

from benchmarks import http_streams
from benchmarks.peer_install import PEERS_DIR, PeerError
from benchmarks.servers import ServerProcess
from benchmarks.settings import Settings, cores, worker_threads
from benchmarks.sweep import measure_row, mpsd_rows, row_line

SERVER = "mlx_lm.server"
PROMPT_CONCURRENCY = 8
PREFILL_STEP_SIZE = 2048


def measure(settings: Settings, mlx_dir: str, progress: Callable[[str], None], server: bool) -> dict:
    """{"mpsd-mlx": {workers: cells}, "mlx_lm.server": {"1": cells} or {"error"}, "settings"}."""
    result: dict = {"tokens_per_stream": settings.mlx_tokens, "levels": list(settings.mlx_levels)}
    result["mpsd-mlx"], _ = mpsd_rows(settings, mlx_dir, progress, backend="mlx-lm", levels=settings.mlx_levels,
                                      max_tokens=settings.mlx_tokens)
    if not server:
        result[SERVER] = {"error": "skipped (--no-peers)"}
        return result
    try:
        result[SERVER] = _server_row(settings, mlx_dir, progress)
    except PeerError as exc:
        result[SERVER] = {"error": str(exc)}
        progress(f"{SERVER}: not run: {exc}")
    return result


def _server_row(settings: Settings, mlx_dir: str, progress: Callable[[str], None]) -> dict:
    import mlx_lm

    threads = worker_threads(1, cores())
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", mlx_dir, "--log-level", "WARNING",
               "--decode-concurrency", str(settings.concurrency), "--prompt-concurrency", str(PROMPT_CONCURRENCY),
               "--prefill-step-size", str(PREFILL_STEP_SIZE)]
    env = {"OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    progress(f"{SERVER} {mlx_lm.__version__}: decode concurrency {settings.concurrency}, "
             f"streams {', '.join(map(str, settings.mlx_levels))}")
    server = ServerProcess(SERVER, command, PEERS_DIR / SERVER / "server.log", env)
    try:
        start = lambda prompt, n: http_streams.CompletionStream(server.port, prompt, n)  # noqa: E731
        cells = measure_row(start, settings, settings.mlx_levels, settings.mlx_tokens, settings.concurrency)
        start_s = round(server.start_to_ready_s, 3)
    finally:
        server.stop()
    progress(f"{SERVER}: " + row_line(cells))
    return {"rows": {"1": cells}, "version": mlx_lm.__version__, "start_to_ready_s": [start_s],
            "batching": f"--decode-concurrency {settings.concurrency} --prompt-concurrency {PROMPT_CONCURRENCY} "
                        f"--prefill-step-size {PREFILL_STEP_SIZE}"}
