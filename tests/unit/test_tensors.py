"""Predict input tensors: every malformed one is an InvalidRequest naming the field, never a numpy error."""

import numpy as np
import pytest

from mpsd.generate_params import InvalidRequest
from mpsd.v1 import inference_pb2
from mpsd.worker.tensors import MAX_DIMS, to_array, to_tensor


def tensor(dtype="float32", shape=(2, 2), data=None):
    data = bytes(16) if data is None else data
    return inference_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


def test_round_trip():
    x = np.arange(6, dtype=np.int16).reshape(2, 3)
    np.testing.assert_array_equal(to_array("x", to_tensor(x)), x)


@pytest.mark.parametrize("fields,field", [
    ({"dtype": "float128"}, "dtype"), ({"dtype": "<f4"}, "dtype"), ({"dtype": ""}, "dtype"),
    ({"shape": (-1, 4)}, "shape"),
    ({"shape": (1,) * (MAX_DIMS + 1), "data": bytes(4)}, "shape"),
    ({"shape": (2**40, 2**40), "data": b""}, "shape"),  # wrapped to 0 bytes in int64 and "matched" empty data
    ({"shape": (2**32, 2**32), "data": b""}, "shape"),
    ({"shape": (0, 2**62), "data": b""}, "shape"),  # empty, but numpy cannot describe it
    ({"shape": (2, 3)}, "data"), ({"shape": ()}, "data"), ({"data": bytes(15)}, "data"),
])
def test_malformed_tensors_are_refused_with_the_field_named(fields, field):
    with pytest.raises(InvalidRequest, match=rf"^inputs\['x'\]\.{field}: "):
        to_array("x", tensor(**fields))


def test_edge_shapes_that_are_valid():
    assert to_array("x", tensor(shape=(), data=bytes(4))).shape == ()
    assert to_array("x", tensor(shape=(0, 1000), data=b"")).shape == (0, 1000)
    assert to_array("x", tensor(shape=(1,) * MAX_DIMS, data=bytes(4))).ndim == MAX_DIMS
