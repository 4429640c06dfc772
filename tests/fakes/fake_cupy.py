"""A CuPy stand-in: NumPy plus the CUDA-only calls the device image pipeline makes.

Arrays are NumPy arrays ("device" memory is host memory); what is fake is the part
of CuPy's API that NumPy lacks: ``asarray`` of objects exposing
``__cuda_array_interface__`` (zero copy, as CuPy does), ``asnumpy``, ``cuda.Device``,
``cuda.Stream`` (context manager, ``ptr``, ``synchronize``), ``cuda.runtime`` and
``cuda.memory.OutOfMemoryError``. ``STATE.fail_allocations`` makes the next
``empty``/``zeros`` calls raise ``OutOfMemoryError`` as CuPy's pool does when the
device is full.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# NumPy's namespace first; the overrides below replace what CuPy does differently.
globals().update({k: getattr(np, k) for k in dir(np) if not k.startswith("_")})


@dataclass
class _State:
    device_count: int = 1
    fail_allocations: int = 0
    streams_created: int = 0
    synchronized: list[int] = field(default_factory=list)
    current_streams: list[int] = field(default_factory=list)


STATE = _State()
_ptrs = itertools.count(0x7F00_0000_1000, 0x100)


def reset(device_count: int = 1) -> None:
    global STATE
    STATE = _State(device_count=device_count)


class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, total: int) -> None:
        super().__init__(
            f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes)."
        )


class CUDARuntimeError(RuntimeError):
    pass


class _CudaInterface:
    """Re-exposes a ``__cuda_array_interface__`` as ``__array_interface__`` (same fields)."""

    def __init__(self, source: Any) -> None:
        self._source = source  # keeps the exporter's memory alive
        cai = dict(source.__cuda_array_interface__)
        cai.pop("stream", None)
        cai["version"] = 3
        self.__array_interface__ = cai


def asarray(a: Any, dtype: Any = None) -> np.ndarray:
    if hasattr(a, "__cuda_array_interface__") and not isinstance(a, np.ndarray):
        a = np.asarray(_CudaInterface(a))
    return np.asarray(a, dtype=dtype)


def asnumpy(a: Any) -> np.ndarray:
    return np.array(a, copy=True)


def _allocate(make: Any, shape: Any, dtype: Any) -> np.ndarray:
    if STATE.fail_allocations:
        STATE.fail_allocations -= 1
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raise OutOfMemoryError(size, 0)
    return make(shape, dtype=dtype)


def empty(shape: Any, dtype: Any = float) -> np.ndarray:  # noqa: F811 - CuPy's allocator
    return _allocate(np.empty, shape, dtype)


def zeros(shape: Any, dtype: Any = float) -> np.ndarray:  # noqa: F811 - CuPy's allocator
    return _allocate(np.zeros, shape, dtype)


class Device:
    def __init__(self, device: int = 0) -> None:
        if not 0 <= device < STATE.device_count:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {device}")
        self.id = device

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False) -> None:
        STATE.streams_created += 1
        self.ptr = 0 if null else next(_ptrs)
        self.non_blocking = non_blocking

    def __enter__(self) -> Stream:
        STATE.current_streams.append(self.ptr)
        return self

    def __exit__(self, *exc: object) -> None:
        STATE.current_streams.pop()

    def synchronize(self) -> None:
        STATE.synchronized.append(self.ptr)


def _device_count() -> int:
    if STATE.device_count == 0:
        raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
    return STATE.device_count


cuda = types.SimpleNamespace(
    Device=Device,
    Stream=Stream,
    runtime=types.SimpleNamespace(getDeviceCount=_device_count, CUDARuntimeError=CUDARuntimeError),
    memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
)
