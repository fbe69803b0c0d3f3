"""Several real mpsd hosts on loopback, and a load of streaming clients over them (test_multi_host, test_nginx)."""

from __future__ import annotations

import contextlib
import socket
import threading

from mpsd.client import Client, MpsdError
from support import Daemon, metric

LM = """
[daemon]
drain_grace = "20s"
health_interval = "0.5s"

[[models]]
name = "lm"
backend = "null-lm"
replicas = 1
"""
LONG_TOKENS = 1000  # a null-lm stream of about 0.1 s alone, about 1 s under load: long enough to be cut by a kill


def free_port() -> int:
    with contextlib.closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def served(daemon: Daemon, model: str, code: str = "OK") -> float:
    return metric(daemon, "mpsd_requests_total", model=model, method="Generate", protocol="grpc", code=code)


def start_host(folder, config: str, port: int, http_listen: str = "127.0.0.1:0") -> Daemon:
    """A daemon on 127.0.0.1:port (a restart takes the same one) with one READY worker and its HTTP edge (/metrics)."""
    daemon = Daemon(folder, config, listen=f"127.0.0.1:{port}", http_listen=http_listen)
    try:
        daemon.start()
        daemon.wait_ready(1, timeout=60)
    except BaseException:
        daemon.close()
        raise
    return daemon


def run_one(client: Client, model: str, max_tokens: int) -> tuple[int, MpsdError | None]:
    """Tokens received, and the error the call ended with (None when it finished)."""
    stream = client.generate("x", model, max_tokens=max_tokens, timeout=60)
    received = 0
    try:
        for _ in stream:
            received += 1
    except MpsdError as exc:
        return received, exc
    assert stream.finish is not None
    return received, None


class Load:
    """`clients` threads calling Generate on model "lm" in a loop over one client's channel until stopped."""

    def __init__(self, client: Client, clients: int, max_tokens: int = LONG_TOKENS) -> None:
        self.client = client
        self.max_tokens = max_tokens
        self.results: list[tuple[int, MpsdError | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.results.append(run_one(self.client, "lm", self.max_tokens))

    def count(self) -> int:
        return len(self.results)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)
            assert not thread.is_alive(), "a call hung"
        self.client.close()
