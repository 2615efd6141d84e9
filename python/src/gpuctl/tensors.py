"""Tensors as the protocol carries them: a dtype, a shape, row-major
little-endian bytes. numpy arrays when numpy is installed; `Tensor`, which
needs nothing, otherwise."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Sequence, Tuple, Union

from .messages import DType

try:  # numpy is optional
    import numpy as _np
except ImportError:  # pragma: no cover - exercised on machines without numpy
    _np = None  # type: ignore[assignment]

# Streamed chunks carry at most this much (protocol/README.md).
CHUNK = 1 << 20

SIZES = {DType.U8: 1, DType.F16: 2, DType.F32: 4, DType.F64: 8, DType.I32: 4, DType.I64: 8, DType.BF16: 2}
# numpy has no bfloat16: its raw 16-bit words come as uint16.
NUMPY = {DType.U8: "u1", DType.F16: "<f2", DType.F32: "<f4", DType.F64: "<f8", DType.I32: "<i4", DType.I64: "<i8", DType.BF16: "<u2"}
FROM_NUMPY = {"u1": DType.U8, "f2": DType.F16, "f4": DType.F32, "f8": DType.F64, "i4": DType.I32, "i8": DType.I64}


@dataclass
class Tensor:
    """A tensor without numpy: `data` holds `product(shape) × size(dtype)` bytes."""

    dtype: DType
    shape: Tuple[int, ...]
    data: Union[bytes, bytearray, memoryview]

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def numpy(self) -> Any:
        """The same bytes as a numpy array (no copy)."""
        if _np is None:
            raise RuntimeError("numpy is not installed: pip install numpy")
        return _np.frombuffer(self.data, dtype=NUMPY[self.dtype]).reshape(self.shape)


def has_numpy() -> bool:
    return _np is not None


def nbytes(dtype: DType, shape: Sequence[int]) -> int:
    total = SIZES[dtype]
    for dim in shape:
        total *= dim
    return total


def allocate(dtype: DType, shape: Sequence[int]) -> Tuple[Any, memoryview]:
    """Room for a tensor that is about to arrive, and a byte view to fill it
    through. numpy's `empty` leaves pages untouched until written, so an
    8192² image costs nothing before its rows come."""
    if _np is not None:
        array = _np.empty(tuple(shape), dtype=NUMPY[dtype])
        flat: Any = array.reshape(-1).view("u1")
        return array, memoryview(flat)
    data = bytearray(nbytes(dtype, shape))
    return Tensor(dtype, tuple(shape), data), memoryview(data)


def is_numpy(value: Any) -> bool:
    return _np is not None and isinstance(value, _np.ndarray)


def to_wire(value: Any, what: str) -> Tuple[DType, Tuple[int, ...], memoryview]:
    """A numpy array or a `Tensor` as dtype, shape and its bytes, without a
    copy when it is already contiguous and little-endian."""
    if isinstance(value, Tensor):
        view = memoryview(value.data).cast("B")
        if len(view) != value.nbytes:
            raise ValueError(f"{what}: {len(view)} bytes for a {value.dtype.name} tensor of shape {list(value.shape)} ({value.nbytes} needed)")
        return value.dtype, tuple(value.shape), view
    if is_numpy(value):
        array = value
        kind = array.dtype.kind + str(array.dtype.itemsize)
        dtype = FROM_NUMPY.get(kind)
        if dtype is None or (array.dtype.itemsize > 1 and array.dtype.byteorder == (">" if sys.byteorder == "little" else "<")):
            raise ValueError(f"{what}: numpy dtype {array.dtype} is not one the protocol carries (uint8, float16/32/64, int32/64, little-endian)")
        array = _np.ascontiguousarray(array)
        if array.dtype.byteorder == ">":
            array = array.astype(array.dtype.newbyteorder("<"))
        flat: Any = array.reshape(-1).view("u1")
        return dtype, tuple(int(d) for d in array.shape), memoryview(flat)
    raise TypeError(f"{what}: expected a numpy array or a gpuctl.Tensor, got {type(value).__name__}")

