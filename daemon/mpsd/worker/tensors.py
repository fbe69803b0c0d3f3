"""mpsd.v1.Tensor <-> numpy arrays, with errors that name the tensor.

Sizes are computed with Python integers before numpy sees the shape: a
declared shape like [2**40, 2**40] must be refused with a sentence, not
overflow int64 to a small number (it wrapped to 0 bytes, so empty data
"matched") and then fail inside numpy as an error the client cannot read.
"""

from __future__ import annotations

import math

import numpy as np

from mpsd.generate_params import InvalidRequest
from mpsd.v1 import inference_pb2

ALLOWED_DTYPES = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
})
# numpy 1.x allows 32 dimensions (2.x allows 64): the lower limit holds for every install.
MAX_DIMS = 32
# Bounds the size a shape describes even when a 0 dimension leaves it empty: numpy refuses
# shapes whose nonzero dimensions multiply past 2**63 bytes, and no input comes near 1 TiB.
MAX_EXTENT_BYTES = 1 << 40


def to_array(name: str, tensor: inference_pb2.Tensor) -> np.ndarray:
    field = f"inputs[{name!r}]"
    if tensor.dtype not in ALLOWED_DTYPES:
        raise InvalidRequest(f"{field}.dtype: {tensor.dtype!r} is not one of {', '.join(sorted(ALLOWED_DTYPES))}")
    shape = list(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise InvalidRequest(f"{field}.shape: {len(shape)} dimensions is over the limit of {MAX_DIMS}")
    if any(dim < 0 for dim in shape):
        raise InvalidRequest(f"{field}.shape: dimensions must be >= 0, got {shape}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    if math.prod(max(dim, 1) for dim in shape) * dtype.itemsize > MAX_EXTENT_BYTES:
        raise InvalidRequest(f"{field}.shape: {shape} of {tensor.dtype} describes more than {MAX_EXTENT_BYTES} bytes")
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidRequest(f"{field}.data: {len(tensor.data)} bytes, but shape {shape} of {tensor.dtype} needs {expected}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(shape))


def to_tensor(array: np.ndarray) -> inference_pb2.Tensor:
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return inference_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape), data=little.tobytes())
