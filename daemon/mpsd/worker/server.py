"""The worker's internal gRPC service: one loaded model behind a unix socket.

The daemon sends every Generate and Chat on one long-lived Steps stream, on a
socket beside this one (step_socket.py): a thread reads it and hands each
request to the decode loop (scheduler.py), the one thread that owns the model,
and the connection's own thread sends each step's events for all of them as
one frame (step_outbox.py, step_session.py). Predict and Stats are plain gRPC
calls on grpc's thread pool.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Iterator

import grpc

from mpsd.chat_params import parse_chat_request
from mpsd.generate_params import InvalidRequest, parse_generate_request
from mpsd.oom import exception_oom
from mpsd.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from mpsd.worker.agents.grammar import CannotConstrain, chat_constraint
from mpsd.worker.agents.matcher import WorkerGrammars
from mpsd.worker.agents.reply_parser import ReplyParser
from mpsd.worker.agents.reply_sink import ReplySink
from mpsd.worker.predict_batcher import PredictBatcher
from mpsd.worker.backends.chat import NoChatTemplate, render_prompt
from mpsd.worker.scheduler import DeadlinePassed, DecodeScheduler, OutOfMemory
from mpsd.step_frames import frame
from mpsd.worker import step_socket
from mpsd.worker.step_outbox import ClientTooSlow, encode
from mpsd.worker.step_session import StepSession
from mpsd.worker.tensors import to_array, to_tensor


class Counters:
    """Counts owned by the worker itself, so they stay true whatever the daemon sees."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tokens = 0
        self.requests = 0
        self.inflight = 0
        self.oom_events = 0
        self.last_oom = ""
        self.step_messages = 0
        self.predict_passes = 0

    def add(self, *, tokens: int = 0, requests: int = 0, inflight: int = 0, messages: int = 0,
            passes: int = 0) -> None:
        with self._lock:
            self.tokens += tokens
            self.requests += requests
            self.inflight += inflight
            self.step_messages += messages
            self.predict_passes += passes

    def record_oom(self, text: str) -> None:
        with self._lock:
            self.oom_events += 1
            self.last_oom = text


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, backend_name: str, model, scheduler: DecodeScheduler | None,
                 model_name: str = "", max_batch_size: int = 1, max_batch_delay_s: float = 0.0,
                 placed_device: str = "") -> None:
        self._worker_id = worker_id
        self._placed_device = placed_device  # where the daemon counts its memory; with the GPUs it can open, below
        self._model_name = model_name
        self._backend_name = backend_name
        self._model = model
        self._scheduler = scheduler  # language models: the one thread that decodes; None for tensor models
        self._counters = Counters()
        self._pid = os.getpid()
        self._sessions: set[StepSession] = set()
        self._sessions_lock = threading.Lock()
        self._grammars = WorkerGrammars(model, backend_name)
        self._batcher: PredictBatcher | None = None  # tensor models with max_batch_size > 1 (predict_batcher.py)
        if max_batch_size > 1 and hasattr(model, "predict"):
            self._batcher = PredictBatcher(self._forward, max_batch_size, max_batch_delay_s, self._oom_text)
            self._batcher.start()

    def stop_batching(self) -> None:
        """After the gRPC server stopped: no Predict is left waiting for the batcher."""
        if self._batcher is not None:
            self._batcher.stop()

    # -- the hop: one Steps connection per daemon link ---------------------------

    def serve_steps(self, connection) -> None:
        """One connection to the Steps socket (step_socket.py): its requests are read on a thread of their own,
        and each batch of their events goes out as one frame from here."""
        session = StepSession(self._submit, self._count)
        with self._sessions_lock:
            self._sessions.add(session)
        threading.Thread(target=session.read, args=(step_socket.requests(connection),), name="mpsd-steps-in",
                         daemon=True).start()
        try:
            while (batch := session.outbox.take()) is not None:
                message = encode(batch, self._worker_id, self._pid, self._failure_status)
                connection.sendall(frame(message.SerializeToString()))
                self._counters.add(messages=1)
                session.sent(batch)
        except OSError:
            pass  # the daemon went away: nothing decodes for it (end() below)
        finally:
            session.end()
            step_socket.hang_up(connection)
            with self._sessions_lock:
                self._sessions.discard(session)

    def finish_streams(self, grace_s: float) -> None:
        """Stopping: each Steps connection ends once its requests have finished (or grace_s passed): the daemon
        sees it close cleanly, with nothing on it lost."""
        deadline = time.monotonic() + grace_s
        with self._sessions_lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.wait_idle(max(0.0, deadline - time.monotonic()))
            session.end()

    def _submit(self, request, deadline: float | None, sink):
        """A Generate or a Chat into the decode loop (or the engine); raises what refuses it (InvalidRequest...).
        A Chat is rendered with the model's chat template here, on the stream's reading thread (backends/chat.py
        says why that is better than on the decode thread), and so is a grammar compiled (agents/matcher.py);
        an engine renders it with its own template."""
        if request.WhichOneof("action") == "generate":
            params = parse_generate_request(request.generate)
            if hasattr(self._scheduler, "submit_chat"):  # an engine
                _refuse_constraint(params.constraint and params.constraint.field, self._backend_name)
                return self._scheduler.submit(params, deadline, sink)
            grammar = self._grammars.row(params.constraint) if params.constraint else None
            return self._scheduler.submit(params, deadline, sink, grammar=grammar)
        chat = parse_chat_request(request.chat)
        if hasattr(self._scheduler, "submit_chat"):
            _refuse_constraint(_chat_constraint_field(chat), self._backend_name)
            return self._scheduler.submit_chat(chat, deadline, sink)
        template = getattr(self._model, "chat_template", None)
        prompt = render_prompt(template, self._model_name, chat)
        syntax = template.tool_syntax if chat.calls_tools else None
        constraint = chat_constraint(chat, syntax, self._grammars.special_literal) if _chat_constraint_field(chat) \
            else None
        grammar = self._grammars.row(constraint) if constraint else None
        if syntax is not None:
            sink = ReplySink(sink, ReplyParser(syntax))
        params = dataclasses.replace(chat.sampling, prompt=prompt, prompt_field="messages", constraint=constraint)
        return self._scheduler.submit(params, deadline, sink, grammar=grammar, keep_special=syntax is not None)

    def _count(self, inflight: int, requests: int, tokens: int) -> None:
        self._counters.add(inflight=inflight, requests=requests, tokens=tokens)

    def _failure_status(self, exc: BaseException) -> tuple[grpc.StatusCode, str]:
        """How a request's failure reaches the daemon: a status it passes on, or UNKNOWN for a bug in the model
        (which the daemon reports as INTERNAL naming this worker). An OOM fails that request only and is counted."""
        if isinstance(exc, InvalidRequest):
            return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if isinstance(exc, (NoChatTemplate, CannotConstrain)):
            return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
        if isinstance(exc, DeadlinePassed):
            return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
        if isinstance(exc, ClientTooSlow):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
        if text := self._oom_text(exc):
            return grpc.StatusCode.RESOURCE_EXHAUSTED, text
        return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}"

    @contextlib.contextmanager
    def _serving(self, context) -> Iterator[None]:
        """A Predict in flight: counted while it runs, its failures turned into the status the daemon relays."""
        self._counters.add(inflight=1)
        try:
            yield
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            if text := self._oom_text(exc):
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, text)
            raise
        finally:
            self._counters.add(inflight=-1, requests=1)

    def _oom_text(self, exc: BaseException) -> str:
        """'' unless `exc` is an out-of-memory error; then it is counted, logged, and this says what ran out."""
        if isinstance(exc, OutOfMemory):
            text = str(exc)  # the scheduler already named it
        elif meaning := exception_oom(exc):
            text = f"out of memory ({meaning}): {exc}"
        else:
            return ""
        self._counters.record_oom(text)
        sys.stderr.write(f"mpsd worker {self._pid}: {text}\n")
        return text

    def Predict(self, request, context):
        if not hasattr(self._model, "predict"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model of backend {self._backend_name} does not take Predict; use Generate")
        with self._serving(context):
            inputs = {name: to_array(name, tensor) for name, tensor in request.inputs.items()}
            outputs = self._forward(inputs) if self._batcher is None else self._batched(inputs, context)
        return inference_pb2.PredictResponse(
            outputs={name: to_tensor(array) for name, array in outputs.items()}, worker_id=self._worker_id,
        )

    def _forward(self, inputs: dict) -> dict:
        """One forward pass of the model, one request's or a batch's."""
        self._counters.add(passes=1)
        return self._model.predict(inputs)

    def _batched(self, inputs: dict, context) -> dict:
        """This request's share of a batched forward pass. A client that leaves, or a deadline that passes, while it
        waits drops it from the batcher's queue: it is never run."""
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        future = self._batcher.submit(inputs, deadline)
        context.add_callback(future.cancel)
        try:
            return future.result(timeout=remaining)
        except DeadlinePassed as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except concurrent.futures.TimeoutError:
            future.cancel()
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed while the request waited for a batch")
        except concurrent.futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "the client left while the request waited for a batch")

    def Stats(self, request, context):
        """Also where the daemon sets the prefix cache's budget (shrinking it to make room, giving it back)."""
        if self._scheduler is not None and request.HasField("prefix_cache_budget"):
            self._scheduler.set_prefix_cache_budget(request.prefix_cache_budget)
        if problem := getattr(self._model, "check_health", lambda: "")():  # an engine that died or hangs
            context.abort(grpc.StatusCode.UNAVAILABLE, problem)
        report = self._model.memory_report()
        return worker_pb2.WorkerStats(
            worker_id=self._worker_id,
            pid=self._pid,
            backend=self._backend_name,
            device=self._model.device,
            context_length=getattr(self._model, "context_length", 0),
            tokens=self._counters.tokens,
            requests=self._counters.requests,
            inflight=self._counters.inflight,
            backend_memory=report.bytes_by_kind,
            backend_memory_note=report.note,
            oom_events=self._counters.oom_events,
            last_oom=self._counters.last_oom,
            step_messages=self._counters.step_messages,
            predict_passes=self._counters.predict_passes,
            placed_device=self._placed_device,
            visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            **self._batch_figures(),
        )

    def _batch_figures(self) -> dict[str, int]:
        scheduler = self._scheduler
        if scheduler is None:
            return {}
        return {"running_sequences": scheduler.running, "kv_bytes": scheduler.kv_bytes,
                "kv_reserve_bytes": scheduler.kv_reserve_bytes,
                "prefix_cache": worker_pb2.PrefixCacheStats(**dataclasses.asdict(scheduler.prefix_cache))}


def _chat_constraint_field(chat) -> str:
    """The field that asks for a Chat's reply to be constrained, or "" when it is free."""
    if chat.tool_choice in ("required", "function"):
        return "tool_choice"
    return "response_format" if chat.response_schema is not None else ""


def _refuse_constraint(field: str | None, backend: str) -> None:
    if field:
        raise CannotConstrain(f"{field}: workers of backend {backend!r} cannot constrain their output (torch-lm and "
                              "mlx-lm can); leave it out")
