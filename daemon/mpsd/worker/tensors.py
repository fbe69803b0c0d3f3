"""mpsd.v1.Tensor <-> numpy arrays, with errors that name the tensor."""

from __future__ import annotations

import numpy as np

from mpsd.generate_params import InvalidRequest
from mpsd.v1 import inference_pb2

ALLOWED_DTYPES = frozenset({
    "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool",
})


def to_array(name: str, tensor: inference_pb2.Tensor) -> np.ndarray:
    if tensor.dtype not in ALLOWED_DTYPES:
        raise InvalidRequest(f"inputs[{name!r}].dtype: {tensor.dtype!r} is not one of {', '.join(sorted(ALLOWED_DTYPES))}")
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidRequest(f"inputs[{name!r}].shape: dimensions must be >= 0, got {list(tensor.shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidRequest(
            f"inputs[{name!r}].data: {len(tensor.data)} bytes, but shape {list(tensor.shape)} of {tensor.dtype} needs {expected}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def to_tensor(array: np.ndarray) -> inference_pb2.Tensor:
    array = np.ascontiguousarray(array)
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return inference_pb2.Tensor(dtype=array.dtype.name, shape=list(array.shape), data=little.tobytes())
