"""Which of an engine's output lines the worker keeps (worker/engine/backend.py: quiet_access_line).

The lines are the access-log formats of the engines run here: mlx_lm.server (the stdlib's http.server) and
llama-cpp-python's server (uvicorn). The worker's own successful calls are dropped; everything else is kept,
since the daemon reads the last 50 lines to say why an engine died.
"""

import pytest

from mpsd.worker.engine.backend import quiet_access_line

QUIET = quiet_access_line(("/health", "/v1/models"))


@pytest.mark.parametrize("line", [
    '127.0.0.1 - - [07/Dec/2026 02:10:00] "POST /v1/completions HTTP/1.1" 200 -',
    '127.0.0.1 - - [07/Dec/2026 02:10:00] "POST /v1/chat/completions HTTP/1.1" 200 -',
    '127.0.0.1 - - [07/Dec/2026 02:10:00] "GET /health HTTP/1.1" 200 -',
    'INFO:     127.0.0.1:40000 - "GET /v1/models HTTP/1.1" 200 OK',
    'INFO:     127.0.0.1:40000 - "POST /v1/completions HTTP/1.1" 200 OK',
    'INFO:     127.0.0.1:40000 - "POST /extras/tokenize/count HTTP/1.1" 200 OK',
])
def test_the_workers_own_successful_calls_are_dropped(line):
    assert QUIET(line)


@pytest.mark.parametrize("line", [
    'INFO:     127.0.0.1:40000 - "POST /v1/completions HTTP/1.1" 500 Internal Server Error',
    '127.0.0.1 - - [07/Dec/2026 02:10:00] "GET /health HTTP/1.1" 503 -',
    'INFO:     127.0.0.1:40000 - "POST /extras/tokenize/count HTTP/1.1" 404 Not Found',
    "ggml_metal_graph_compute: command buffer 0 failed with status 5",
    "llama_model_load: error loading model: tensor 'output.weight' not found",
    '127.0.0.1 - - [07/Dec/2026 02:10:00] "POST /v1/embeddings HTTP/1.1" 200 -',  # not a call of the worker's
])
def test_failures_and_everything_else_are_kept(line):
    assert not QUIET(line)


def test_a_configured_health_path_replaces_the_defaults():
    quiet = quiet_access_line(("/ready",))
    assert quiet('"GET /ready HTTP/1.1" 200') and not quiet('"GET /health HTTP/1.1" 200')
