"""Requests protobuf cannot parse get INVALID_ARGUMENT from the public service, not grpc's UNKNOWN."""

import asyncio

import grpc
from mpsd.supervisor.edge.inference import InferenceService, add_inference_service
from mpsd.supervisor.edge.metrics import UNKNOWN_MODEL, RequestMetrics
from mpsd.v1 import inference_pb2

BAD_UTF8_PROMPT = b"\x0a\x04demo" + b"\x12\x02\xff\xfe"  # model="demo", prompt=<2 bytes that are not UTF-8>
BAD_UTF8_TENSOR_NAME = b"\x0a\x01m" + b"\x12\x04" + b"\x0a\x02\xc3\x28"  # model="m", inputs={<bad UTF-8>: ...}


async def call(path: str, payload: bytes, stream: bool, service: InferenceService | None = None) -> tuple[grpc.StatusCode, str]:
    """Sends raw bytes to a real grpc.aio server holding the service (by default one with no models)."""
    server = grpc.aio.server()
    add_inference_service(service or InferenceService({}, lambda name: True), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            method = (channel.unary_stream if stream else channel.unary_unary)(
                path, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call = method(payload, timeout=10)
                if stream:
                    async for _ in call:
                        pass
                else:
                    await call
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details()
            raise AssertionError("the call succeeded")
    finally:
        await server.stop(0)


def test_invalid_utf8_in_generate_is_invalid_argument():
    code, details = asyncio.run(call("/mpsd.v1.Inference/Generate", BAD_UTF8_PROMPT, stream=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request: not a valid mpsd.v1.GenerateRequest") and "UTF-8" in details


def test_invalid_utf8_in_a_predict_map_key_is_invalid_argument():
    code, details = asyncio.run(call("/mpsd.v1.Inference/Predict", BAD_UTF8_TENSOR_NAME, stream=False))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("request: not a valid mpsd.v1.PredictRequest"), details


def test_corrupt_wire_format_is_invalid_argument():
    code, details = asyncio.run(call("/mpsd.v1.Inference/Generate", b"\xff\xff\xff", stream=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request: "), details


def test_a_request_that_parses_still_reaches_the_service():
    valid = inference_pb2.GenerateRequest(model="nope", prompt="The").SerializeToString()
    code, details = asyncio.run(call("/mpsd.v1.Inference/Generate", valid, stream=True))
    assert code == grpc.StatusCode.NOT_FOUND and "no model named 'nope'" in details
    valid = inference_pb2.PredictRequest(model="nope").SerializeToString()
    code, details = asyncio.run(call("/mpsd.v1.Inference/Predict", valid, stream=False))
    assert code == grpc.StatusCode.NOT_FOUND and "no model named 'nope'" in details


def test_undecodable_and_unknown_model_requests_are_counted_without_minting_a_model_label():
    metrics = RequestMetrics()
    service = InferenceService({}, lambda name: True, metrics=metrics)
    asyncio.run(call("/mpsd.v1.Inference/Generate", BAD_UTF8_PROMPT, stream=True, service=service))
    asyncio.run(call("/mpsd.v1.Inference/Predict", inference_pb2.PredictRequest(model="nope").SerializeToString(),
                     stream=False, service=service))

    def count(method: str, code: str) -> float | None:
        labels = {"model": UNKNOWN_MODEL, "method": method, "protocol": "grpc", "code": code}
        return metrics.registry.get_sample_value("mpsd_requests_total", labels)

    assert count("Generate", "INVALID_ARGUMENT") == 1 and count("Predict", "NOT_FOUND") == 1
    assert metrics.registry.get_sample_value("mpsd_requests_total", {"model": "nope", "method": "Predict",
                                                                     "protocol": "grpc", "code": "NOT_FOUND"}) is None
