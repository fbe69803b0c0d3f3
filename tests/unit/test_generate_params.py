import pytest

from mpsd.generate_params import DEFAULT_MAX_TOKENS, InvalidRequest, check_against_model, parse_generate_request
from mpsd.v1 import inference_pb2


def request(**fields):
    fields.setdefault("prompt", "Hello")
    return inference_pb2.GenerateRequest(**fields)


def test_defaults():
    params = parse_generate_request(request())
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (DEFAULT_MAX_TOKENS, 1.0, 1.0, None, ())


def test_explicit_values_including_greedy_and_seed_zero():
    params = parse_generate_request(request(max_tokens=5, temperature=0.0, top_p=0.5, seed=0, stop=["\n"]))
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (5, 0.0, 0.5, 0, ("\n",))


@pytest.mark.parametrize("fields,field", [
    ({"prompt": ""}, "prompt"), ({"prompt": "   "}, "prompt"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"stop": [""]}, "stop"),
])
def test_bad_fields_are_named(fields, field):
    with pytest.raises(InvalidRequest, match=f"^{field}:"):
        parse_generate_request(request(**fields))


def test_max_tokens_above_context():
    params = parse_generate_request(request(max_tokens=2000))
    with pytest.raises(InvalidRequest, match="max_tokens: 2000 is above the model's limit of 1024"):
        check_against_model(params, 1024)
    check_against_model(params, 0)  # unknown context: the worker checks
