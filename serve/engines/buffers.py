"""Where a batch's bytes are: a contiguous NumPy array in host memory, or a CUDA array
(anything exposing ``__cuda_array_interface__``, as CuPy arrays do) on the GPU, so that
an engine can take a device-resident batch by pointer instead of through the host."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


@dataclass(frozen=True, slots=True)
class ArrayBuffer:
    """A C-contiguous array's memory: ``device`` (``cuda`` or ``cpu``), address, shape, dtype."""

    device: Literal["cuda", "cpu"]
    pointer: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes per row (one image of a batch)."""
        return int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


def buffer_of(batch: Any) -> ArrayBuffer:
    """The memory of a contiguous host or CUDA array.

    Raises:
        ValueError: ``batch`` is neither, or not C-contiguous.
    """
    cai = getattr(batch, "__cuda_array_interface__", None)
    if cai is not None and not isinstance(batch, np.ndarray):
        shape, dtype = tuple(cai["shape"]), np.dtype(cai["typestr"])
        strides = cai.get("strides")
        contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize)
        buffer = ArrayBuffer("cuda", int(cai["data"][0]), shape, dtype)
    elif isinstance(batch, np.ndarray):
        contiguous = batch.flags.c_contiguous
        buffer = ArrayBuffer("cpu", int(batch.ctypes.data), batch.shape, batch.dtype)
    else:
        raise ValueError(f"cannot bind a {type(batch).__name__}: not a NumPy or CUDA array")
    if not contiguous:
        raise ValueError(f"cannot bind a non-contiguous batch of shape {buffer.shape}")
    return buffer


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))
