"""The worker's side of the hop without processes: the outbox, a stream's session, and the message it sends."""

from __future__ import annotations

import threading

import grpc

from mpsd.generate_params import InvalidRequest
from mpsd.v1 import inference_pb2, worker_pb2
from mpsd.worker.backends.base import Finished, TokenEvent
from mpsd.worker import step_outbox
from mpsd.worker.step_outbox import ClientTooSlow, OutboxSink, StepOutbox, encode
from mpsd.worker.step_session import StepSession


def test_the_outbox_shows_a_steps_events_together_only_once_flushed():
    outbox = StepOutbox()
    outbox.put(1, TokenEvent(0, 5, "a"))
    outbox.put(2, TokenEvent(0, 6, "b"))
    taken: list = []
    reader = threading.Thread(target=lambda: taken.append(outbox.take()))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive(), "took events before the step was flushed"
    outbox.flush()
    reader.join(5)
    assert taken == [[(1, TokenEvent(0, 5, "a")), (2, TokenEvent(0, 6, "b"))]]
    outbox.put(1, TokenEvent(1, 7, "c"))
    outbox.close()
    assert outbox.take() == [(1, TokenEvent(1, 7, "c"))], "what was put before close still goes"
    assert outbox.take() is None


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Worker:
    """submit() as the worker service gives it to a session, and the counters the session moves."""

    def __init__(self) -> None:
        self.handles: dict[int, Handle] = {}
        self.counts = [0, 0, 0]  # inflight, requests ended, tokens

    def submit(self, request, deadline, sink):
        if request.generate.prompt == "bad":
            raise InvalidRequest("prompt: bad")
        self.handles[request.id] = handle = Handle()
        return handle

    def count(self, inflight: int, requests: int, tokens: int) -> None:
        self.counts = [self.counts[0] + inflight, self.counts[1] + requests, self.counts[2] + tokens]


def generate(request_id: int, prompt: str = "hi") -> worker_pb2.StepRequest:
    return worker_pb2.StepRequest(id=request_id, generate=inference_pb2.GenerateRequest(prompt=prompt))


def cancel(request_id: int) -> worker_pb2.StepRequest:
    return worker_pb2.StepRequest(id=request_id, cancel=True)


def test_a_request_runs_until_the_message_with_its_finish_is_sent():
    worker = Worker()
    session = StepSession(worker.submit, worker.count)
    session.read(iter([generate(1), generate(2)]))  # the daemon's side ends here: what still runs is cancelled
    assert all(h.cancelled for h in worker.handles.values()) and worker.counts == [0, 2, 0]
    assert session.outbox.take() is None, "an ended session sends nothing more"

    worker = Worker()
    session = StepSession(worker.submit, worker.count)
    requests = [generate(1), generate(2)]
    reading = threading.Thread(target=session.read, args=(_until(requests, session),))
    reading.start()
    _until_counted(worker, [2, 0, 0])
    session.sent([(1, TokenEvent(0, 1, "a")), (2, TokenEvent(0, 1, "b")), (1, Finished("stop", 1, 1))])
    assert worker.counts == [1, 1, 2], "request 1 ended with its Finish; two tokens went out"
    session.sent([(2, RuntimeError("boom"))])
    assert worker.counts == [0, 2, 2] and not any(h.cancelled for h in worker.handles.values())
    assert session.wait_idle(1)
    session.end()
    reading.join(5)


def test_a_cancel_reaches_only_its_request_and_a_refused_one_fails_alone():
    worker = Worker()
    session = StepSession(worker.submit, worker.count)
    session.read(iter([generate(1), generate(2, "bad"), cancel(1), cancel(99)]))
    assert worker.handles[1].cancelled
    batch = session.outbox.take()
    assert [(request_id, type(event)) for request_id, event in batch] == [(2, InvalidRequest)]
    assert session.outbox.take() is None


def test_one_message_carries_tokens_finishes_and_failures_with_their_request_numbers():
    def status(exc):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)

    message = encode([(7, TokenEvent(0, 42, "hi")), (8, Finished("length", 3, 1, cached_tokens=2)),
                      (9, InvalidRequest("prompt: empty"))], "w-0", 123, status)
    token, finish, failure = message.events
    assert (token.id, token.response.index, token.response.text, token.response.token_id) == (7, 0, "hi", 42)
    assert finish.id == 8 and finish.response.finish.reason == "length"
    assert finish.response.finish.usage.cached_tokens == 2 and finish.response.finish.worker_pid == 123
    assert (failure.id, failure.code, failure.details) == (9, grpc.StatusCode.INVALID_ARGUMENT.value[0], "prompt: empty")
    assert not failure.HasField("response")


def _until(requests, session: StepSession):
    """The daemon's side: the requests, then held open until the session ends."""
    yield from requests
    session.outbox.take()  # blocks until end() closes the outbox


def _until_counted(worker: Worker, counts: list[int]) -> None:
    for _ in range(500):
        if worker.counts == counts:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"counts {worker.counts}, not {counts}")


def test_a_request_sends_at_most_its_window_beyond_what_the_daemon_took_and_a_stalled_one_is_cut_alone(monkeypatch):
    outbox, cuts = StepOutbox(), []
    sink = OutboxSink(outbox, 1, window=4, stream_buffer=3, cut=lambda request_id, exc: cuts.append((request_id, exc)))
    other = OutboxSink(outbox, 2, window=4, stream_buffer=3, cut=lambda request_id, exc: cuts.append((request_id, exc)))
    for index in range(6):
        sink.put(TokenEvent(index, index, "x"))
        other.put(TokenEvent(index, index, "y"))
        if index < 2:
            other.take(index + 1)  # the other client reads as it goes
    sink.flush()
    sent = outbox.take()
    assert [e.index for r, e in sent if r == 1] == [0, 1, 2, 3], "four sent, two held"
    assert [e.index for r, e in sent if r == 2] == [0, 1, 2, 3, 4, 5]
    sink.take(2)  # the daemon handed two to its client: two more may go, in order
    assert [e.index for _, e in outbox.take()] == [4, 5]
    monkeypatch.setattr(step_outbox, "STALL_S", 0.0)
    for index in range(6, 12):
        sink.put(TokenEvent(index, index, "x"))
    assert len(cuts) == 1 and cuts[0][0] == 1 and isinstance(cuts[0][1], ClientTooSlow)
    assert "stream_buffer" in str(cuts[0][1])
    sink.put(TokenEvent(12, 12, "x"))
    assert len(cuts) == 1, "cut once; nothing more of it is kept"


def test_frames_come_back_whole_however_the_socket_splits_them_and_an_absurd_length_ends_the_stream():
    import socket

    import pytest

    from mpsd.step_frames import FrameError, HEADER, frame, read_frames

    ours, theirs = socket.socketpair()
    payloads = [b"", b"x" * 70_000, worker_pb2.StepRequest(id=3, cancel=True).SerializeToString()]
    data = b"".join(frame(p) for p in payloads)
    def write() -> None:
        for start in range(0, len(data), 999):  # in pieces that cut headers and payloads
            ours.sendall(data[start:start + 999])
        ours.close()

    writer = threading.Thread(target=write)
    writer.start()
    assert list(read_frames(theirs)) == payloads
    writer.join(5)
    theirs.close()

    ours, theirs = socket.socketpair()
    ours.sendall(HEADER.pack(1 << 31))
    with pytest.raises(FrameError):
        list(read_frames(theirs))
    ours.close()
    theirs.close()
