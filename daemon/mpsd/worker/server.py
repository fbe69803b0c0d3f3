"""The worker's internal gRPC service: one loaded model behind a unix socket.

Handlers run on grpc's thread pool, one per stream; a language model's
handlers only hand requests to the decode loop (scheduler.py) and relay its
events, so the one thread that owns the model decodes for all of them. The
daemon already limits how many requests a worker gets at once (its
concurrency), so the pool is sized for that with a little room for probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from typing import Iterator

import grpc

from mpsd.chat_params import parse_chat_request
from mpsd.generate_params import GenerateParams, InvalidRequest, parse_generate_request
from mpsd.oom import exception_oom
from mpsd.v1 import inference_pb2, worker_pb2, worker_pb2_grpc
from mpsd.worker.backends.base import Finished
from mpsd.worker.backends.chat import NoChatTemplate, render_prompt
from mpsd.worker.scheduler import DeadlinePassed, DecodeScheduler, OutOfMemory, Submission
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

    def add(self, *, tokens: int = 0, requests: int = 0, inflight: int = 0) -> None:
        with self._lock:
            self.tokens += tokens
            self.requests += requests
            self.inflight += inflight

    def record_oom(self, text: str) -> None:
        with self._lock:
            self.oom_events += 1
            self.last_oom = text


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, worker_id: str, backend_name: str, model, scheduler: DecodeScheduler | None,
                 model_name: str = "") -> None:
        self._worker_id = worker_id
        self._model_name = model_name
        self._backend_name = backend_name
        self._model = model
        self._scheduler = scheduler  # language models: the one thread that decodes; None for tensor models
        self._counters = Counters()
        self._pid = os.getpid()

    def Generate(self, request, context):
        """Hands the request to the decode loop and relays its events; leaving or a deadline drops it there."""
        self._refuse_unless_generating(context)
        try:
            params = parse_generate_request(request)
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        yield from self._decode(params, context)

    def Chat(self, request, context):
        """Renders the conversation with the model's chat template on this handler thread (backends/chat.py says
        why that is safe there and better than on the decode thread), then decodes the prompt as Generate does.
        An engine renders it with its own template: the messages go to it as they are."""
        self._refuse_unless_generating(context)
        try:
            chat = parse_chat_request(request)
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if hasattr(self._scheduler, "submit_chat"):
            yield from self._run(lambda deadline: self._scheduler.submit_chat(chat, deadline), context)
            return
        try:
            prompt = render_prompt(getattr(self._model, "chat_template", None), self._model_name, chat)
        except NoChatTemplate as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        yield from self._decode(dataclasses.replace(chat.sampling, prompt=prompt, prompt_field="messages"), context)

    def _refuse_unless_generating(self, context) -> None:
        if self._scheduler is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model of backend {self._backend_name} does not generate; use Predict")

    def _decode(self, params: GenerateParams, context):
        yield from self._run(lambda deadline: self._scheduler.submit(params, deadline), context)

    def _run(self, submit, context):
        remaining = context.time_remaining()
        submission = submit(None if remaining is None else time.monotonic() + remaining)
        context.add_callback(submission.cancel)
        with self._serving(context):
            yield from self._stream(submission)

    @contextlib.contextmanager
    def _serving(self, context) -> Iterator[None]:
        """One request in flight: counted while it runs, its failures turned into the status the daemon relays."""
        self._counters.add(inflight=1)
        try:
            yield
        except InvalidRequest as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except DeadlinePassed as exc:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        except Exception as exc:
            self._abort_if_oom(exc, context)
            raise
        finally:
            self._counters.add(inflight=-1, requests=1)

    def _abort_if_oom(self, exc: Exception, context) -> None:
        """An OOM inside a request fails that request only; the daemon learns of it from Stats."""
        if isinstance(exc, OutOfMemory):
            text = str(exc)  # the scheduler already named it
        elif meaning := exception_oom(exc):
            text = f"out of memory ({meaning}): {exc}"
        else:
            return
        self._counters.record_oom(text)
        sys.stderr.write(f"mpsd worker {self._pid}: {text}\n")
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, text)

    def _stream(self, submission: Submission):
        for event in submission:
            if isinstance(event, Finished):
                yield inference_pb2.GenerateResponse(finish=inference_pb2.Finish(
                    reason=event.reason,
                    usage=inference_pb2.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens,
                                              cached_tokens=event.cached_tokens),
                    worker_id=self._worker_id,
                    worker_pid=self._pid,
                ))
                return
            self._counters.add(tokens=1)
            yield inference_pb2.GenerateResponse(index=event.index, text=event.text, token_id=max(event.token_id, 0))

    def Predict(self, request, context):
        if not hasattr(self._model, "predict"):
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"model of backend {self._backend_name} does not take Predict; use Generate")
        with self._serving(context):
            inputs = {name: to_array(name, tensor) for name, tensor in request.inputs.items()}
            outputs = self._model.predict(inputs)
        return inference_pb2.PredictResponse(
            outputs={name: to_tensor(array) for name, array in outputs.items()}, worker_id=self._worker_id,
        )

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
            **self._batch_figures(),
        )

    def _batch_figures(self) -> dict[str, int]:
        scheduler = self._scheduler
        if scheduler is None:
            return {}
        return {"running_sequences": scheduler.running, "kv_bytes": scheduler.kv_bytes,
                "kv_reserve_bytes": scheduler.kv_reserve_bytes,
                "prefix_cache": worker_pb2.PrefixCacheStats(**dataclasses.asdict(scheduler.prefix_cache))}
