"""Load generators: streams against mpsd's public gRPC API."""

from __future__ import annotations

from typing import Iterator

from mpsd.v1 import inference_pb2


def start_stream(stub, model: str, prompt: str, max_tokens: int) -> Iterator[object]:
    """Starts the call now (grpc sends it before returning); the iterator yields once per token."""
    request = inference_pb2.GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    call = stub.Generate(request, timeout=600)
    return (message for message in call if not message.HasField("finish"))
