"""Load generators: timed streams against mpsd's public gRPC API."""

from __future__ import annotations

from benchmarks import timing
from benchmarks.timing import StreamTiming, time_tokens
from mpsd.v1 import inference_pb2


def timed_stream(stub, model: str, prompt: str, max_tokens: int) -> StreamTiming:
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return time_tokens(m for m in stub.Generate(request, timeout=600) if not m.HasField("finish"))


def aggregate_tps(stub, model: str, prompt: str, max_tokens: int, streams: int, repeats: int) -> tuple[float, list[float]]:
    """Tokens per second over all streams run concurrently; and every stream's TTFT."""
    return timing.aggregate_tps(lambda: timed_stream(stub, model, prompt, max_tokens), streams, repeats)
