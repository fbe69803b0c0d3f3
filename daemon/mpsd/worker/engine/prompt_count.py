"""A completion prompt's length in tokens, asked of the engine itself, for engines whose streams carry no usage.

llama-server, mlx_lm.server and ds4-server end a stream with usage when
stream_options.include_usage asks; llama-cpp-python's server (0.3) ignores it,
so a Generate through it would report 0 prompt tokens. For a completion the
prompt is plain text, and the engine's own tokenize endpoint counts it as the
engine did: llama-cpp-python's POST /extras/tokenize/count, or llama-server's
POST /tokenize. A chat prompt is rendered by the engine's template, which
nothing outside it sees: without usage it stays uncounted (0), as docs/engines.md
says. Which endpoint answers is learned on first use and kept.
"""

from __future__ import annotations

import http.client
import json
import threading
from typing import Callable

TIMEOUT_S = 5.0
MISSING = (404, 405, 501)  # the engine has no such endpoint

# (path, the body's text field, the answer's count): llama-cpp-python's first, then llama-server's.
ENDPOINTS: tuple[tuple[str, str, Callable[[dict], int]], ...] = (
    ("/extras/tokenize/count", "input", lambda answer: int(answer["count"])),
    ("/tokenize", "content", lambda answer: len(answer["tokens"])),
)


class PromptCounter:
    """count(text) -> tokens, or 0 where the engine has no endpoint that counts it. An endpoint the engine does not
    have (404, 405, 501) is not asked again; one that answered is the only one asked from then on."""

    def __init__(self, port: int, endpoints=ENDPOINTS) -> None:
        self._port = port
        self._endpoints = list(endpoints)
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        with self._lock:
            endpoints = list(self._endpoints)
        for endpoint in endpoints:
            status, counted = self._ask(endpoint, text)
            with self._lock:
                if counted is not None:
                    self._endpoints = [endpoint]
                    return counted
                if status in MISSING and endpoint in self._endpoints:
                    self._endpoints.remove(endpoint)
        return 0

    def _ask(self, endpoint, text: str) -> tuple[int, int | None]:
        """The HTTP status (0: no answer) and the count, if the answer held one."""
        path, field, read = endpoint
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=TIMEOUT_S)
        try:
            connection.request("POST", path, body=json.dumps({field: text, "add_special": True}),
                               headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                return response.status, None
            return 200, read(json.loads(body))
        except (OSError, http.client.HTTPException):
            return 0, None
        except (ValueError, KeyError, TypeError):
            return 200, None
        finally:
            connection.close()
