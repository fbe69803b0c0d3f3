"""How the Steps stream is framed on its unix socket, for both sides: a 4-byte length, then a protobuf message.

Steps is the one stream between the daemon and a worker that carries every
Generate and Chat (worker.proto's StepRequest in, StepEvents out). It runs on
a plain unix socket beside the worker's gRPC one, not as a gRPC stream: a
gRPC message costs the sync server a blocking send on its own thread and
the daemon a poller round trip, where a frame here costs one write and one
read. The socket sits in the private (0700) run directory, as the gRPC one
does; nothing else speaks this framing.
"""

from __future__ import annotations

import socket
import struct
from typing import Iterator

HEADER = struct.Struct("!I")
MAX_FRAME_BYTES = 256 << 20  # far above any request (a million-character prompt is a few MiB): past it, a bug


class FrameError(Exception):
    """The other side wrote something that is not a frame: the stream cannot go on."""


def frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"a frame of {length} bytes (at most {MAX_FRAME_BYTES})")
    return length


def read_frames(sock: socket.socket) -> Iterator[bytes]:
    """Each frame's payload, until the other side closes (or the socket breaks, which ends it the same way)."""
    pending = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except OSError:
            return
        if not chunk:
            return
        pending += chunk
        while len(pending) >= HEADER.size:
            length = frame_length(bytes(pending[:HEADER.size]))
            end = HEADER.size + length
            if len(pending) < end:
                break
            yield bytes(pending[HEADER.size:end])
            del pending[:end]
