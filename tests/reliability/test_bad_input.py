"""Bad input, generated: property-based tests over the public gRPC API of one real daemon (issue 7).

Hypothesis draws GenerateRequests over every field (prompts empty to ~1 MB,
max_tokens over all of int32, temperatures and top_p from NaN to +-inf, seeds,
stop lists, unknown models), raw request bytes that are not a valid message or
hold invalid UTF-8, PredictRequests with malformed tensors (unknown dtypes,
byte counts that do not match the shape, negative or huge dimensions, too many
of them, missing and extra inputs), and messages on both sides of the size
limit. Each case must end in a finished stream or reply, or in the status code
the documented rules give, with a sentence that names the bad field: never
UNKNOWN or INTERNAL, never a hang, never a worker crash. The last test checks
the daemon came out as it went in and prints how many cases ran.

The size limit is grpc's default receive limit, 4 MiB: mpsd sets none on its
public server or on its workers', so both hops refuse the same messages and a
request the daemon takes always fits through to the worker.

Examples are derandomized so CI runs the same cases every time;
MPSD_SOAK=N (`./dev soak`: 10) runs N times as many, freshly drawn.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import operator

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpsd.generate_params import MAX_PROMPT_CHARS, MAX_STOP_SEQUENCES
from mpsd.v1 import inference_pb2
from mpsd.worker.tensors import ALLOWED_DTYPES, MAX_DIMS, MAX_EXTENT_BYTES
from support import DEMO_AND_LINEAR, Daemon, running_daemon, soak_factor, wait_for

CONFIG = '[daemon]\nhealth_interval = "0.5s"\n' + DEMO_AND_LINEAR
VERB = {"demo": "Generate", "linear": "Predict"}
RECEIVE_LIMIT = 4 * 1024 * 1024  # grpc's default max receive message length; mpsd sets none
CALL_TIMEOUT_S = 20  # far above any case here: a call that runs into it is a hang
MAX_SERVED_TOKENS = 6  # requests that will be served generate at most this many, so the run stays fast
Code = grpc.StatusCode

CASES: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)  # property -> code name -> count


def examples(count: int) -> settings:
    """The same cases on every CI run; MPSD_SOAK=N draws N times as many, fresh each time."""
    factor = soak_factor()
    return settings(max_examples=count * factor, derandomize=factor == 1, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclasses.dataclass
class Target:
    daemon: Daemon
    channel: grpc.Channel
    context_length: int
    workers_at_start: list[tuple]

    def generate(self, request: inference_pb2.GenerateRequest | bytes):
        method = self.channel.unary_stream("/mpsd.v1.Inference/Generate", request_serializer=_serializer(request),
                                           response_deserializer=inference_pb2.GenerateResponse.FromString)
        return outcome(lambda: list(method(request, timeout=CALL_TIMEOUT_S)))

    def predict(self, request: inference_pb2.PredictRequest | bytes):
        method = self.channel.unary_unary("/mpsd.v1.Inference/Predict", request_serializer=_serializer(request),
                                          response_deserializer=inference_pb2.PredictResponse.FromString)
        return outcome(lambda: method(request, timeout=CALL_TIMEOUT_S))


def _serializer(request):
    """Raw bytes go out as they are: that is how a client sends what our own stubs never would."""
    return (lambda b: b) if isinstance(request, bytes) else type(request).SerializeToString


def outcome(call) -> tuple[Code, str, object]:
    try:
        return Code.OK, "", call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def worker_identities(daemon: Daemon) -> list[tuple]:
    return [(w["id"], w["pid"], w["restarts"], w["state"]) for w in daemon.status()["workers"]]


@pytest.fixture(scope="module")
def target(demo_model, tmp_path_factory):
    with running_daemon(tmp_path_factory.mktemp("bad-input"), CONFIG, 2) as daemon:
        context = next(m["context_length"] for m in daemon.status()["models"] if m["name"] == "demo")
        yield Target(daemon, daemon.channel(), context, worker_identities(daemon))


# ---- what the documented rules say each request must get -------------------------------------------------------

def refused_model(model: str, verb: str) -> tuple[Code, set[str]] | None:
    if not model:
        return Code.INVALID_ARGUMENT, {"model"}  # two models are configured: the name is required
    if model not in VERB:
        return Code.NOT_FOUND, {"model"}
    if VERB[model] != verb:
        return Code.FAILED_PRECONDITION, {"model"}
    return None


def max_tokens_of(request: inference_pb2.GenerateRequest) -> int:
    return request.max_tokens if request.HasField("max_tokens") else 128  # the documented default


def bad_generate_fields(request: inference_pb2.GenerateRequest, context_length: int) -> set[str]:
    max_tokens = max_tokens_of(request)
    temperature, top_p = request.temperature, request.top_p
    broken = {
        "prompt": not request.prompt.strip() or len(request.prompt) > MAX_PROMPT_CHARS,
        "max_tokens": not 1 <= max_tokens <= context_length,
        "temperature": request.HasField("temperature") and not (math.isfinite(temperature) and temperature >= 0),
        "top_p": request.HasField("top_p") and not 0 < top_p <= 1,  # NaN fails the comparison too
        "stop": len(request.stop) > MAX_STOP_SEQUENCES or "" in request.stop,
    }
    return {field for field, bad in broken.items() if bad}


def generate_refusal(request: inference_pb2.GenerateRequest, context_length: int) -> tuple[Code, set[str]] | None:
    """The code and the fields one of which the answer must name; None: the daemon passes it to a worker."""
    bad = bad_generate_fields(request, context_length)
    return refused_model(request.model, "Generate") or ((Code.INVALID_ARGUMENT, bad) if bad else None)


def bad_tensor_field(tensor: inference_pb2.Tensor) -> str | None:
    """Checked in this order: a dtype must be known before a shape has a byte size."""
    if tensor.dtype not in ALLOWED_DTYPES:
        return "dtype"
    shape, itemsize = list(tensor.shape), np.dtype(tensor.dtype).itemsize
    if len(shape) > MAX_DIMS or any(d < 0 for d in shape) or math.prod(max(d, 1) for d in shape) * itemsize > MAX_EXTENT_BYTES:
        return "shape"
    return "data" if len(tensor.data) != math.prod(shape) * itemsize else None


def linear_takes(inputs) -> bool:
    """torch.nn.Linear(4, 2) called as module(input=...)."""
    tensor = inputs.get("input")
    return set(inputs) == {"input"} and tensor.dtype == "float32" and len(tensor.shape) >= 1 and tensor.shape[-1] == 4


def predict_refusal(request: inference_pb2.PredictRequest) -> tuple[Code, set[str]] | None:
    bad = {f"inputs[{name!r}].{field}" for name, tensor in request.inputs.items() if (field := bad_tensor_field(tensor))}
    if refusal := refused_model(request.model, "Predict"):
        return refusal
    if bad:
        return Code.INVALID_ARGUMENT, bad
    return None if linear_takes(request.inputs) else (Code.INVALID_ARGUMENT, {"inputs"})


# ---- checking what came back -----------------------------------------------------------------------------------

def assert_refused(code: Code, details: str, expected: tuple[Code, set[str]]) -> None:
    want, fields = expected
    assert code != Code.DEADLINE_EXCEEDED, f"no answer within {CALL_TIMEOUT_S}s: a hang ({details})"
    assert code == want, f"{code.name}: {details!r}; expected {want.name} naming one of {sorted(fields)}"
    assert details.startswith(tuple(f"{field}: " for field in fields)) and len(details.split()) >= 3, details


def assert_finished_stream(messages: list, request: inference_pb2.GenerateRequest) -> None:
    *tokens, last = messages
    assert last.HasField("finish") and not any(m.HasField("finish") for m in tokens), "exactly one final message, last"
    finish = last.finish
    assert [t.index for t in tokens] == list(range(len(tokens)))
    assert finish.usage.completion_tokens - len(tokens) in (0, 1), "a stop may end the stream without text"
    assert 0 < finish.usage.prompt_tokens and finish.usage.completion_tokens <= max_tokens_of(request)
    assert finish.reason in ("stop", "length") and finish.worker_id == "demo-0"
    text = "".join(t.text for t in tokens)
    assert not any(stop in text for stop in request.stop), "generation ends before the first stop sequence"


def check_generate(target: Target, request: inference_pb2.GenerateRequest, wire: bytes | None = None) -> Code:
    """wire: the bytes to send when they are not the request's own encoding (raw cases)."""
    code, details, messages = target.generate(request if wire is None else wire)
    expected = generate_refusal(request, target.context_length)
    if expected:
        assert_refused(code, details, expected)
    elif code != Code.OK:  # only the worker knows the prompt's token count
        assert_refused(code, details, (Code.INVALID_ARGUMENT, {"prompt"}))
    else:
        assert_finished_stream(messages, request)
    return code


def check_predict(target: Target, request: inference_pb2.PredictRequest, wire: bytes | None = None) -> Code:
    code, details, reply = target.predict(request if wire is None else wire)
    expected = predict_refusal(request)
    if expected:
        assert_refused(code, details, expected)
        return code
    assert code == Code.OK, f"{code.name}: {details}"
    shape = list(request.inputs["input"].shape[:-1]) + [2]
    out = reply.outputs["output"]
    assert (set(reply.outputs), out.dtype, list(out.shape)) == ({"output"}, "float32", shape)
    assert len(out.data) == math.prod(shape) * 4 and reply.worker_id == "linear-0"
    return code


def parsed(message_class, data: bytes):
    """What protobuf reads from `data`, or None where it cannot: the daemon parses with the same library."""
    try:
        return message_class.FromString(data)
    except DecodeError:
        return None


def check_raw(target: Target, message_class, data: bytes) -> Code:
    generate = message_class is inference_pb2.GenerateRequest
    request = parsed(message_class, data)
    if request is not None:  # bytes no stub would send, but a valid message all the same
        return (check_generate if generate else check_predict)(target, request, wire=data)
    code, details, _ = (target.generate if generate else target.predict)(data)
    assert code == Code.INVALID_ARGUMENT, f"{code.name}: {details}"
    assert details.startswith(f"request: not a valid {message_class.DESCRIPTOR.full_name} ("), details
    return code


# ---- strategies ------------------------------------------------------------------------------------------------

def repeated(unit: st.SearchStrategy, low: int, high: int) -> st.SearchStrategy:
    """Long strings built by repetition: hypothesis cannot draw 100 KB of text directly."""
    return st.builds(operator.mul, unit, st.integers(low, high))


# Each request starts as one the daemon serves; a few of its fields (often none) are then swapped for
# anything their proto type can hold. Fully random requests almost never get past the model name.
models = st.one_of(st.just("demo"), st.just("linear"), st.sampled_from(["", "Demo", "demo ", "demo\x00", "nope"]),
                   st.text(max_size=30))
SERVED_GENERATE = {
    "model": st.just("demo"),
    "prompt": st.text(min_size=1, max_size=40).filter(str.strip),
    "max_tokens": st.one_of(st.none(), st.integers(1, MAX_SERVED_TOKENS)),
    "temperature": st.one_of(st.none(), st.floats(0, 2, width=32)),
    "top_p": st.one_of(st.none(), st.floats(0, 1, exclude_min=True, width=32)),
    "seed": st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
}
float32s = st.one_of(st.none(), st.floats(width=32),
                     st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.0, 3.4e38, math.inf, -math.inf, math.nan]))
WILD_GENERATE = {
    "model": models,
    "prompt": st.one_of(
        st.text(max_size=40),
        st.sampled_from(["", " ", "\n\t \u3000", "\x00", "\u200b", "\ufeff", "\U0001f642" * 3]),
        repeated(st.text(min_size=1, max_size=3), 1_000, 300_000),
        repeated(st.just("x"), MAX_PROMPT_CHARS - 1, MAX_PROMPT_CHARS + 1),
    ),
    "max_tokens": st.one_of(st.none(), st.sampled_from([0, -1, 1024, 1025, -2**31, 2**31 - 1]), st.integers(-2**31, 2**31 - 1)),
    "temperature": float32s,
    "top_p": float32s,
    "seed": st.sampled_from([0, 2**63, 2**64 - 1]),
    "stop": st.lists(st.one_of(st.text(max_size=4), st.just(""), repeated(st.text(min_size=1, max_size=2), 100, 100_000)),
                     max_size=MAX_STOP_SEQUENCES + 4),
}


@st.composite
def generate_requests(draw) -> inference_pb2.GenerateRequest:
    wild = draw(st.sets(st.sampled_from(sorted(WILD_GENERATE)), max_size=3))
    fields = {name: draw((WILD_GENERATE if name in wild else SERVED_GENERATE)[name]) for name in SERVED_GENERATE}
    return inference_pb2.GenerateRequest(**{name: value for name, value in fields.items() if value is not None})


dtypes = st.one_of(st.sampled_from(sorted(ALLOWED_DTYPES)),
                   st.sampled_from(["", "<f4", "float128", "bfloat16", "complex64", "object", "FLOAT32", "int"]),
                   st.text(max_size=8))
dims = st.one_of(st.integers(0, 5), st.integers(-3, -1), st.sampled_from([2**31, 2**32, 2**40, 2**62, 2**63 - 1, -2**63]))
linear_shapes = st.lists(st.integers(0, 5), max_size=3).map(lambda s: s + [4])  # what the linear model takes
shapes = st.one_of(
    st.lists(dims, max_size=6),
    st.lists(st.sampled_from([1, 1, 1, 2, 0]), min_size=MAX_DIMS - 1, max_size=MAX_DIMS + 4),
)
TENSOR_FIELDS = ["dtype", "shape", "data"]


def tensor(draw, wild: set[str]) -> inference_pb2.Tensor:
    """A float32 [..., 4] tensor with matching data, except for the fields named in `wild`."""
    dtype = draw(dtypes if "dtype" in wild else st.just("float32"))
    shape = draw(shapes if "shape" in wild else linear_shapes)
    size = math.prod(shape) * np.dtype(dtype).itemsize if dtype in ALLOWED_DTYPES and min(shape, default=0) >= 0 else None
    if "data" in wild or size is None or size > 1 << 20:
        data = draw(st.binary(max_size=64))
    else:
        data = draw(st.binary(min_size=size, max_size=size)) if size <= 256 else bytes(size)
    return inference_pb2.Tensor(dtype=dtype, shape=shape, data=data)


@st.composite
def any_tensor(draw) -> inference_pb2.Tensor:
    return tensor(draw, draw(st.sets(st.sampled_from(TENSOR_FIELDS))))


@st.composite
def predict_requests(draw) -> inference_pb2.PredictRequest:
    wild = draw(st.sets(st.sampled_from(["model", "names", *TENSOR_FIELDS]), max_size=3))
    model = draw(models if "model" in wild else st.just("linear"))
    inputs = {"input": tensor(draw, wild)}
    if "names" in wild:  # extra inputs, odd names, or the one the model needs missing
        names = st.one_of(st.sampled_from(["input", "extra", "", "x", "input "]), st.text(max_size=8))
        inputs = draw(st.dictionaries(names, any_tensor(), max_size=3)) | (inputs if draw(st.booleans()) else {})
    return inference_pb2.PredictRequest(model=model, inputs=inputs)


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (wire type 2): strings, bytes, messages, map entries."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


invalid_utf8 = st.builds(
    lambda before, bad, after: before + bad + after, st.binary(max_size=8),
    st.sampled_from([b"\xff", b"\x80", b"\xc0\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]),
    st.binary(max_size=8),
).filter(not_utf8)
corruptions = st.one_of(
    st.sampled_from([b"\x80", b"\x12\x7f", b"\x12\x05ab", b"\x0f", b"\x17\x00", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]),
    st.binary(min_size=1, max_size=32),
)
FOUR_FLOATS = inference_pb2.Tensor(dtype="float32", shape=[4], data=bytes(16))
TENSOR = FOUR_FLOATS.SerializeToString()
GENERATE_BASE = inference_pb2.GenerateRequest(model="demo", prompt="The", max_tokens=2).SerializeToString()
PREDICT_BASE = inference_pb2.PredictRequest(model="linear", inputs={"input": FOUR_FLOATS}).SerializeToString()
raw_generate = st.one_of(
    st.builds(lambda number, bad: GENERATE_BASE + field(number, bad), st.sampled_from([1, 2, 7]), invalid_utf8),
    st.builds(operator.add, st.just(GENERATE_BASE), corruptions),
    st.binary(max_size=64),
)
raw_predict = st.one_of(
    st.builds(lambda bad: PREDICT_BASE + field(1, bad), invalid_utf8),  # the model name
    st.builds(lambda bad: PREDICT_BASE + field(2, field(1, bad) + field(2, TENSOR)), invalid_utf8),  # an input's name
    st.builds(lambda bad: PREDICT_BASE + field(2, field(1, b"input") + field(2, field(1, bad))), invalid_utf8),  # dtype
    st.builds(operator.add, st.just(PREDICT_BASE), corruptions),
    st.binary(max_size=64),
)


def sized_request(verb: str, size: int):
    """A request of `size` encoded bytes (Predict: within a few rows of 4 float32 of it)."""
    if verb == "Generate":
        head = inference_pb2.GenerateRequest(model="demo", max_tokens=1).ByteSize() + 1 + len(varint(size))
        return inference_pb2.GenerateRequest(model="demo", prompt="x" * (size - head), max_tokens=1)
    rows = max(size // 16 - 1, 1)
    return inference_pb2.PredictRequest(
        model="linear", inputs={"input": inference_pb2.Tensor(dtype="float32", shape=[rows, 4], data=bytes(rows * 16))})


# ---- the properties --------------------------------------------------------------------------------------------

@examples(400)
@given(request=generate_requests())
def test_generate_answers_every_request_with_a_stream_or_a_clear_refusal(target, request):
    if generate_refusal(request, target.context_length) is None:  # to be served: still valid, only cheaper
        request.max_tokens = min(max_tokens_of(request), MAX_SERVED_TOKENS)
    CASES["Generate"][check_generate(target, request).name] += 1


@examples(200)
@given(data=st.one_of(st.tuples(st.just(inference_pb2.GenerateRequest), raw_generate),
                      st.tuples(st.just(inference_pb2.PredictRequest), raw_predict)))
def test_raw_bytes_that_do_not_parse_are_invalid_argument(target, data):
    message_class, raw = data
    CASES["raw bytes"][check_raw(target, message_class, raw).name] += 1


@examples(400)
@given(request=predict_requests())
def test_predict_answers_every_tensor_with_outputs_or_a_clear_refusal(target, request):
    CASES["Predict"][check_predict(target, request).name] += 1


@examples(8)
@given(verb=st.sampled_from(["Generate", "Predict"]),
       size=st.one_of(st.sampled_from([RECEIVE_LIMIT, RECEIVE_LIMIT + 1]), st.integers(RECEIVE_LIMIT - 64, RECEIVE_LIMIT + 64),
                      st.integers(RECEIVE_LIMIT - 2**20, RECEIVE_LIMIT + 2**20)))
def test_messages_over_the_size_limit_are_resource_exhausted_and_smaller_ones_are_served(target, verb, size):
    request = sized_request(verb, size)
    if request.ByteSize() <= RECEIVE_LIMIT:
        code = (check_generate if verb == "Generate" else check_predict)(target, request)
    else:
        code, details, _ = target.generate(request) if verb == "Generate" else target.predict(request)
        assert code == Code.RESOURCE_EXHAUSTED and "larger than max" in details, f"{code.name}: {details}"
    CASES["size limit"][code.name] += 1


def test_the_daemon_and_its_workers_come_out_as_they_went_in(target):
    daemon = target.daemon
    assert daemon.process.poll() is None, "the daemon is still running"
    wait_for(lambda: all(w["inflight"] == 0 for w in daemon.status()["workers"]), 10, "no request in flight")
    status = daemon.status()
    assert all(m["queued"] == 0 for m in status["models"])
    assert worker_identities(daemon) == target.workers_at_start, "no worker crashed, restarted or left READY"
    assert check_generate(target, inference_pb2.GenerateRequest(model="demo", prompt="The module", max_tokens=4)) == Code.OK
    assert check_predict(target, sized_request("Predict", 16)) == Code.OK
    log = daemon.log()
    assert "Traceback" not in log and "retrying once on another worker" not in log, log[-3000:]
    for worker in status["workers"]:
        assert not any("Traceback" in line for line in worker["stderr_tail"]), worker["stderr_tail"]
    print("\nbad input: " + "; ".join(f"{sum(c.values())} {name} cases {dict(c)}" for name, c in CASES.items()))
