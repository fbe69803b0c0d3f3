"""Load generators: timed streams against mpsd's public gRPC API."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import time

from mpsd.v1 import inference_pb2


@dataclasses.dataclass
class StreamTiming:
    ttft_s: float
    gaps_s: list[float]      # between consecutive tokens
    tokens: int
    total_s: float


def timed_stream(stub, model: str, prompt: str, max_tokens: int) -> StreamTiming:
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    started = time.perf_counter()
    last = started
    ttft = 0.0
    gaps: list[float] = []
    tokens = 0
    for message in stub.Generate(request, timeout=600):
        if message.HasField("finish"):
            break
        now = time.perf_counter()
        if tokens == 0:
            ttft = now - started
        else:
            gaps.append(now - last)
        last = now
        tokens += 1
    return StreamTiming(ttft, gaps, tokens, time.perf_counter() - started)


def aggregate_tps(stub, model: str, prompt: str, max_tokens: int, streams: int, repeats: int) -> tuple[float, list[float]]:
    """Tokens per second over all streams run concurrently; and every stream's TTFT."""
    def one_client() -> list[StreamTiming]:
        return [timed_stream(stub, model, prompt, max_tokens) for _ in range(repeats)]

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = [t for batch in pool.map(lambda _: one_client(), range(streams)) for t in batch]
    wall = time.perf_counter() - started
    return sum(r.tokens for r in results) / wall, [r.ttft_s for r in results]
