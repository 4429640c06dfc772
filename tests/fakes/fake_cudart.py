"""A fake of the cuda-python runtime API (``cudart``) subset triggerfish calls.

Device memory is simulated: ``cudaMalloc`` returns integer handles in an
address range no host allocation can have, each mapping to a ctypes buffer.
Copies check their direction and their bounds, so passing a host pointer as a
device pointer, or copying more bytes than were allocated, returns an error
code exactly where real CUDA would (or where real CUDA would corrupt memory).

Work enqueued on a stream (async copies, TensorRT executions) runs only at
``cudaStreamSynchronize``/``cudaStreamDestroy``, so code that reads outputs
before synchronizing reads stale bytes, as it would on a GPU.

Every call returns a tuple whose first element is a ``cudaError_t``, as in
cuda-python. Module state is reset by :func:`reset` (the pytest fixture does).
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum


class cudaError_t(IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700


class cudaMemcpyKind(IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStream_t:  # noqa: N801
    """An opaque stream handle; like cuda-python's, ``int()`` gives its address."""

    def __init__(self, handle: int = 0) -> None:
        self._handle = handle

    def __int__(self) -> int:
        return self._handle

    def getPtr(self) -> int:  # noqa: N802 - cuda-python's name
        return self._handle

    def __repr__(self) -> str:
        return f"<cudaStream_t 0x{self._handle:x}>"


@dataclass
class cudaDeviceProp:  # noqa: N801
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int  # noqa: N815
    multiProcessorCount: int  # noqa: N815


@dataclass
class FakeGpu:
    """The simulated device; tests change it to model other GPUs."""

    name: str = "NVIDIA H100 80GB HBM3"
    major: int = 9
    minor: int = 0
    total_memory: int = 80 * 1024**3
    multiprocessors: int = 132
    fast_fp16: bool = True
    fast_int8: bool = True
    driver_version: int = 12040
    runtime_version: int = 12040
    count: int = 1


@dataclass
class _State:
    gpu: FakeGpu = field(default_factory=FakeGpu)
    allocations: dict[int, ctypes.Array] = field(default_factory=dict)
    streams: dict[int, list[Callable[[], None]]] = field(default_factory=dict)
    current_device: dict[int, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)


_DEVICE_BASE = 0xDE00_0000_0000_0000  # far above any user-space host address
_STREAM_BASE = 0x5700_0000
_ALIGN = 256
_ids = itertools.count(1)
STATE = _State()


def reset(gpu: FakeGpu | None = None) -> None:
    """Forget all allocations, streams and recorded calls."""
    global STATE
    STATE = _State(gpu=gpu or FakeGpu())


def _fail(code: cudaError_t, why: str) -> tuple[cudaError_t]:
    STATE.errors.append(f"{code.name}: {why}")
    return (code,)


def _record(name: str) -> None:
    STATE.calls.append(name)


def device_region(ptr: int) -> tuple[ctypes.Array, int] | None:
    """The allocation holding device address ``ptr`` and the offset into it."""
    with STATE.lock:
        for base, buf in STATE.allocations.items():
            if base <= ptr < base + len(buf):
                return buf, ptr - base
    return None


def read_device(ptr: int, nbytes: int) -> bytes:
    """Bytes at a device address (used by the fake TensorRT); raises on a bad range."""
    region = device_region(ptr)
    if region is None or region[1] + nbytes > len(region[0]):
        raise MemoryError(f"illegal device read of {nbytes} bytes at 0x{ptr:x}")
    buf, off = region
    return bytes(buf[off : off + nbytes])


def write_device(ptr: int, data: bytes) -> None:
    """Write bytes at a device address; raises on a bad range."""
    region = device_region(ptr)
    if region is None or region[1] + len(data) > len(region[0]):
        raise MemoryError(f"illegal device write of {len(data)} bytes at 0x{ptr:x}")
    buf, off = region
    ctypes.memmove(ctypes.addressof(buf) + off, data, len(data))


def device_bytes_fit(ptr: int, nbytes: int) -> bool:
    region = device_region(ptr)
    return region is not None and region[1] + nbytes <= len(region[0])


def stream_handle(stream: object) -> int | None:
    """The integer handle of ``stream`` (0 = default stream), or None when it is not a stream."""
    if stream is None:
        return 0
    if isinstance(stream, cudaStream_t | int):
        return int(stream)
    return None


def enqueue(stream: object, op: Callable[[], None]) -> bool:
    """Queue ``op`` on a live stream (the default stream runs it now)."""
    handle = stream_handle(stream)
    with STATE.lock:
        if handle == 0:
            op()
            return True
        if handle is None or handle not in STATE.streams:
            return False
        STATE.streams[handle].append(op)
    return True


def _pointer(value: object) -> int | None:
    # cuda-python also accepts buffer objects; triggerfish passes integer addresses only,
    # and the fake insists so that a numpy array passed by mistake fails here.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- device -----------------------------------------------------------------------------------


def cudaGetDeviceCount() -> tuple[cudaError_t, int]:  # noqa: N802
    _record("cudaGetDeviceCount")
    return cudaError_t.cudaSuccess, STATE.gpu.count


def cudaGetDevice() -> tuple[cudaError_t, int]:  # noqa: N802
    _record("cudaGetDevice")
    return cudaError_t.cudaSuccess, STATE.current_device.get(threading.get_ident(), 0)


def cudaSetDevice(device: int) -> tuple[cudaError_t]:  # noqa: N802
    _record("cudaSetDevice")
    if not 0 <= device < STATE.gpu.count:
        return _fail(cudaError_t.cudaErrorInvalidDevice, f"device {device}")
    STATE.current_device[threading.get_ident()] = device
    return (cudaError_t.cudaSuccess,)


def cudaGetDeviceProperties(device: int) -> tuple[cudaError_t, cudaDeviceProp | None]:  # noqa: N802
    _record("cudaGetDeviceProperties")
    if not 0 <= device < STATE.gpu.count:
        return cudaError_t.cudaErrorInvalidDevice, None
    g = STATE.gpu
    return cudaError_t.cudaSuccess, cudaDeviceProp(
        name=g.name.encode(),
        major=g.major,
        minor=g.minor,
        totalGlobalMem=g.total_memory,
        multiProcessorCount=g.multiprocessors,
    )


def cudaDriverGetVersion() -> tuple[cudaError_t, int]:  # noqa: N802
    return cudaError_t.cudaSuccess, STATE.gpu.driver_version


def cudaRuntimeGetVersion() -> tuple[cudaError_t, int]:  # noqa: N802
    return cudaError_t.cudaSuccess, STATE.gpu.runtime_version


def cudaGetErrorName(error: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
    return cudaError_t.cudaSuccess, cudaError_t(error).name.encode()


# --- memory -----------------------------------------------------------------------------------


def cudaMalloc(size: int) -> tuple[cudaError_t, int]:  # noqa: N802
    _record("cudaMalloc")
    if not isinstance(size, int) or size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    with STATE.lock:
        used = sum(len(b) for b in STATE.allocations.values())
        if used + size > STATE.gpu.total_memory:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        ptr = _DEVICE_BASE + next(_ids) * (1 << 32)
        STATE.allocations[ptr] = (ctypes.c_char * size)()
    return cudaError_t.cudaSuccess, ptr


def cudaFree(ptr: int) -> tuple[cudaError_t]:  # noqa: N802
    _record("cudaFree")
    with STATE.lock:
        if ptr not in STATE.allocations:
            return _fail(cudaError_t.cudaErrorInvalidDevicePointer, f"free of 0x{ptr:x}")
        del STATE.allocations[ptr]
    return (cudaError_t.cudaSuccess,)


def _copy_op(
    dst: object, src: object, count: int, kind: cudaMemcpyKind
) -> Callable[[], None] | str:
    d, s = _pointer(dst), _pointer(src)
    if d is None or s is None or not isinstance(count, int) or count < 0:
        return "pointers must be integer addresses and count a non-negative int"
    d_dev, s_dev = device_region(d) is not None, device_region(s) is not None
    if kind is cudaMemcpyKind.cudaMemcpyDefault:
        kind = cudaMemcpyKind(int(s_dev) * 2 + int(d_dev)) if (s_dev or d_dev) else kind
    expect = {
        cudaMemcpyKind.cudaMemcpyHostToDevice: (False, True),
        cudaMemcpyKind.cudaMemcpyDeviceToHost: (True, False),
        cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True),
    }.get(kind)
    if expect is None or (s_dev, d_dev) != expect:
        return f"{kind.name} with src on device={s_dev}, dst on device={d_dev}"
    if s_dev and not device_bytes_fit(s, count):
        return f"copy of {count} bytes reads past the allocation at 0x{s:x}"
    if d_dev and not device_bytes_fit(d, count):
        return f"copy of {count} bytes writes past the allocation at 0x{d:x}"

    def op() -> None:
        if kind is cudaMemcpyKind.cudaMemcpyHostToDevice:
            write_device(d, ctypes.string_at(s, count))
        elif kind is cudaMemcpyKind.cudaMemcpyDeviceToHost:
            ctypes.memmove(d, read_device(s, count), count)
        else:
            write_device(d, read_device(s, count))

    return op


def cudaMemcpy(dst: object, src: object, count: int, kind: cudaMemcpyKind) -> tuple[cudaError_t]:  # noqa: N802
    _record("cudaMemcpy")
    op = _copy_op(dst, src, count, cudaMemcpyKind(kind))
    if isinstance(op, str):
        return _fail(cudaError_t.cudaErrorInvalidValue, op)
    op()
    return (cudaError_t.cudaSuccess,)


def cudaMemcpyAsync(  # noqa: N802
    dst: object, src: object, count: int, kind: cudaMemcpyKind, stream: object
) -> tuple[cudaError_t]:
    _record("cudaMemcpyAsync")
    op = _copy_op(dst, src, count, cudaMemcpyKind(kind))
    if isinstance(op, str):
        return _fail(cudaError_t.cudaErrorInvalidValue, op)
    if not enqueue(stream, op):
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {stream!r}")
    return (cudaError_t.cudaSuccess,)


# --- streams ----------------------------------------------------------------------------------


def cudaStreamCreate() -> tuple[cudaError_t, cudaStream_t]:  # noqa: N802
    _record("cudaStreamCreate")
    with STATE.lock:
        handle = _STREAM_BASE + next(_ids) * _ALIGN
        STATE.streams[handle] = []
    return cudaError_t.cudaSuccess, cudaStream_t(handle)


def _drain(handle: int) -> None:
    while True:
        with STATE.lock:
            queue = STATE.streams.get(handle)
            if not queue:
                return
            op = queue.pop(0)
        op()


def cudaStreamSynchronize(stream: object) -> tuple[cudaError_t]:  # noqa: N802
    _record("cudaStreamSynchronize")
    handle = stream_handle(stream)
    if handle is None or (handle != 0 and handle not in STATE.streams):
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {stream!r}")
    try:
        _drain(handle)
    except MemoryError as err:
        return _fail(cudaError_t.cudaErrorIllegalAddress, str(err))
    return (cudaError_t.cudaSuccess,)


def cudaStreamDestroy(stream: object) -> tuple[cudaError_t]:  # noqa: N802
    _record("cudaStreamDestroy")
    handle = stream_handle(stream)
    if handle is None or handle not in STATE.streams:
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {stream!r}")
    _drain(handle)  # CUDA finishes pending work before releasing the stream
    with STATE.lock:
        del STATE.streams[handle]
    return (cudaError_t.cudaSuccess,)
