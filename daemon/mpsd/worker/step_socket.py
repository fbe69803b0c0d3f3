"""The worker's Steps socket: where the daemon connects to send requests and read each step's events.

A thread accepts connections (the daemon opens one per worker, and a new one
if that one broke) and gives each to `serve` on a thread of its own, which
reads nothing itself: WorkerService.serve_steps starts the session's reading
thread and sends its outbox (step_frames.py says why a socket and not gRPC).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Callable, Iterator

from mpsd.step_frames import read_frames
from mpsd.v1 import worker_pb2


def listen(path: str, serve: Callable[[socket.socket], None]) -> socket.socket:
    """Binds `path` (replacing a stale one) and accepts until the listener is closed."""
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(8)
    threading.Thread(target=_accept, args=(listener, serve), name="mpsd-steps-accept", daemon=True).start()
    return listener


def _accept(listener: socket.socket, serve: Callable[[socket.socket], None]) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return  # closed: the worker is stopping
        threading.Thread(target=serve, args=(connection,), name="mpsd-steps-out", daemon=True).start()


def requests(connection: socket.socket) -> Iterator[worker_pb2.StepRequest]:
    """The daemon's StepRequests, until it closes its side; a frame that does not parse ends the stream too."""
    for payload in read_frames(connection):
        yield worker_pb2.StepRequest.FromString(payload)


def hang_up(connection: socket.socket) -> None:
    """Ends the connection both ways, so the thread reading it returns too."""
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    connection.close()
