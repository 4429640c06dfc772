"""A fake of the cuda-python runtime API (``cudart``) subset triggerfish calls.

Device memory is simulated: ``cudaMalloc`` returns integer handles in an
address range no host allocation can have, each mapping to a ctypes buffer.
Copies check their direction and their bounds, so passing a host pointer as a
device pointer, or copying more bytes than were allocated, returns an error
code exactly where real CUDA would (or where real CUDA would corrupt memory).

Like CUDA, the fake keeps a *current device per host thread* (``cudaSetDevice``);
several GPUs can be simulated (:func:`reset` with ``gpus``) and whatever the
fake TensorRT builds or deserializes is done for the calling thread's device.

Work enqueued on a stream (async copies, TensorRT executions) runs only at
``cudaStreamSynchronize``/``cudaStreamDestroy``, so code that reads outputs
before synchronizing reads stale bytes, as it would on a GPU. An async copy
from pageable (not ``cudaMallocHost``) memory is counted: on a GPU it silently
becomes synchronous. Streams can be captured into CUDA graphs and replayed.

A *sticky* error (``cudaErrorIllegalAddress`` from a kernel that faulted, see
:func:`inject_fault`) corrupts the device's context as on a GPU: from then on
every call made with that device current returns the same error.

Every call returns a tuple whose first element is a ``cudaError_t``, as in
cuda-python. Module state is reset by :func:`reset` (the pytest fixture does).
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum


class cudaError_t(IntEnum):  # noqa: N801 - cuda-python's name
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorMemoryAllocation = 2
    cudaErrorInvalidDevicePointer = 17
    cudaErrorInvalidDevice = 101
    cudaErrorInvalidResourceHandle = 400
    cudaErrorIllegalAddress = 700
    cudaErrorLaunchFailure = 719
    cudaErrorStreamCaptureUnsupported = 900
    cudaErrorStreamCaptureInvalidated = 901


class cudaMemcpyKind(IntEnum):  # noqa: N801
    cudaMemcpyHostToHost = 0
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3
    cudaMemcpyDefault = 4


class cudaStreamCaptureMode(IntEnum):  # noqa: N801
    cudaStreamCaptureModeGlobal = 0
    cudaStreamCaptureModeThreadLocal = 1
    cudaStreamCaptureModeRelaxed = 2


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


class cudaGraph_t(cudaStream_t):  # noqa: N801
    """An opaque graph handle."""


class cudaGraphExec_t(cudaStream_t):  # noqa: N801
    """An opaque executable-graph handle."""


@dataclass
class cudaDeviceProp:  # noqa: N801
    name: bytes
    major: int
    minor: int
    totalGlobalMem: int  # noqa: N815
    multiProcessorCount: int  # noqa: N815


@dataclass
class FakeGpu:
    """One simulated device; tests change it to model other GPUs."""

    name: str = "NVIDIA H100 80GB HBM3"
    major: int = 9
    minor: int = 0
    total_memory: int = 80 * 1024**3
    multiprocessors: int = 132
    fast_fp16: bool = True
    fast_int8: bool = True
    driver_version: int = 12040
    #: What cuda-python's own (statically bundled) runtime reports: not necessarily the
    #: CUDA runtime TensorRT was linked against.
    runtime_version: int = 12040
    graphs_supported: bool = True


@dataclass
class _Op:
    run: Callable[[], None]
    uses: frozenset[int]  # device allocations the op reads or writes


@dataclass
class _State:
    gpus: list[FakeGpu] = field(default_factory=lambda: [FakeGpu()])
    allocations: dict[int, ctypes.Array] = field(default_factory=dict)
    allocation_device: dict[int, int] = field(default_factory=dict)
    host_allocations: dict[int, ctypes.Array] = field(default_factory=dict)
    streams: dict[int, list[_Op]] = field(default_factory=dict)
    stream_device: dict[int, int] = field(default_factory=dict)
    capturing: dict[int, list[_Op] | None] = field(default_factory=dict)  # None: invalidated
    graphs: dict[int, list[_Op]] = field(default_factory=dict)
    graph_execs: dict[int, list[_Op]] = field(default_factory=dict)
    graph_launches: int = 0
    current_device: dict[int, int] = field(default_factory=dict)
    sticky: dict[int, cudaError_t] = field(default_factory=dict)
    pending_faults: list[cudaError_t] = field(default_factory=list)
    pageable_async_copies: int = 0
    calls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def gpu(self) -> FakeGpu:
        """The calling thread's current device."""
        return self.gpus[current_device()]


_DEVICE_BASE = 0xDE00_0000_0000_0000  # far above any user-space host address
_STREAM_BASE = 0x5700_0000
_ALIGN = 256
_ids = itertools.count(1)
STATE = _State()
_SUCCESS = cudaError_t.cudaSuccess


def reset(gpu: FakeGpu | None = None, gpus: list[FakeGpu] | None = None) -> None:
    """Forget all allocations, streams and recorded calls; simulate ``gpus`` (or one ``gpu``)."""
    global STATE
    STATE = _State(gpus=list(gpus) if gpus else [gpu or FakeGpu()])


def current_device() -> int:
    """The calling thread's current device (0 until it calls ``cudaSetDevice``)."""
    return STATE.current_device.get(threading.get_ident(), 0)


def inject_fault(code: cudaError_t = cudaError_t.cudaErrorIllegalAddress) -> None:
    """Make the next kernel (a TensorRT execution) fault with ``code``, a sticky error."""
    STATE.pending_faults.append(code)


def take_fault() -> cudaError_t | None:
    """Used by the fake TensorRT when a kernel runs: the injected fault, if any."""
    with STATE.lock:
        return STATE.pending_faults.pop(0) if STATE.pending_faults else None


class KernelFault(Exception):
    """Raised inside stream work to simulate a faulting kernel."""

    def __init__(self, code: cudaError_t, why: str) -> None:
        super().__init__(why)
        self.code = code


def _fail(code: cudaError_t, why: str) -> tuple[cudaError_t]:
    STATE.errors.append(f"{code.name}: {why}")
    return (code,)


def _record(name: str) -> cudaError_t | None:
    """Record the call; return the sticky error of the current device, if it has one."""
    STATE.calls.append(name)
    return STATE.sticky.get(current_device())


def device_region(ptr: int) -> tuple[ctypes.Array, int] | None:
    """The allocation holding device address ``ptr`` and the offset into it."""
    base = allocation_base(ptr)
    return None if base is None else (STATE.allocations[base], ptr - base)


def allocation_base(ptr: int) -> int | None:
    with STATE.lock:
        for base, buf in STATE.allocations.items():
            if base <= ptr < base + len(buf):
                return base
    return None


def read_device(ptr: int, nbytes: int) -> bytes:
    """Bytes at a device address (used by the fake TensorRT); raises on a bad range."""
    region = device_region(ptr)
    if region is None or region[1] + nbytes > len(region[0]):
        raise KernelFault(
            cudaError_t.cudaErrorIllegalAddress, f"illegal read of {nbytes} bytes at 0x{ptr:x}"
        )
    buf, off = region
    return bytes(buf[off : off + nbytes])


def write_device(ptr: int, data: bytes) -> None:
    """Write bytes at a device address; raises on a bad range."""
    region = device_region(ptr)
    if region is None or region[1] + len(data) > len(region[0]):
        raise KernelFault(
            cudaError_t.cudaErrorIllegalAddress,
            f"illegal write of {len(data)} bytes at 0x{ptr:x}",
        )
    buf, off = region
    ctypes.memmove(ctypes.addressof(buf) + off, data, len(data))


def device_bytes_fit(ptr: int, nbytes: int) -> bool:
    region = device_region(ptr)
    return region is not None and region[1] + nbytes <= len(region[0])


def is_pinned(ptr: int, nbytes: int) -> bool:
    """Whether ``[ptr, ptr + nbytes)`` lies in one ``cudaMallocHost`` allocation."""
    with STATE.lock:
        for buf in STATE.host_allocations.values():
            base = ctypes.addressof(buf)
            if base <= ptr and ptr + nbytes <= base + len(buf):
                return True
    return False


def stream_handle(stream: object) -> int | None:
    """The integer handle of ``stream`` (0 = default stream), or None when it is not a stream."""
    if stream is None:
        return 0
    if isinstance(stream, cudaStream_t | int):
        return int(stream)
    return None


def enqueue(stream: object, op: Callable[[], None], uses: Iterable[int] = ()) -> bool:
    """Queue ``op`` on a live stream (the default stream runs it now); while the stream is
    being captured, the op is recorded into the graph instead."""
    handle = stream_handle(stream)
    bases = frozenset(b for b in (allocation_base(p) for p in uses) if b is not None)
    with STATE.lock:
        if handle == 0:
            op()
            return True
        if handle is None or handle not in STATE.streams:
            return False
        if handle in STATE.capturing:
            recorded = STATE.capturing[handle]
            if recorded is not None:
                recorded.append(_Op(op, bases))
            return True
        STATE.streams[handle].append(_Op(op, bases))
    return True


def invalidate_capture(stream: object) -> None:
    """Fake TensorRT: work that cannot be captured was enqueued; the capture is now invalid."""
    handle = stream_handle(stream)
    with STATE.lock:
        if handle in STATE.capturing:
            STATE.capturing[handle] = None


def _pointer(value: object) -> int | None:
    # cuda-python also accepts buffer objects; triggerfish passes integer addresses only,
    # and the fake insists so that a numpy array passed by mistake fails here.
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- device -----------------------------------------------------------------------------------


def cudaGetDeviceCount() -> tuple[cudaError_t, int]:  # noqa: N802
    _record("cudaGetDeviceCount")
    return _SUCCESS, len(STATE.gpus)


def cudaGetDevice() -> tuple[cudaError_t, int]:  # noqa: N802
    _record("cudaGetDevice")
    return _SUCCESS, current_device()


def cudaSetDevice(device: int) -> tuple[cudaError_t]:  # noqa: N802
    STATE.calls.append("cudaSetDevice")
    if not 0 <= device < len(STATE.gpus):
        return _fail(cudaError_t.cudaErrorInvalidDevice, f"device {device}")
    STATE.current_device[threading.get_ident()] = device
    return (_SUCCESS,)


def cudaGetDeviceProperties(device: int) -> tuple[cudaError_t, cudaDeviceProp | None]:  # noqa: N802
    _record("cudaGetDeviceProperties")
    if not 0 <= device < len(STATE.gpus):
        return cudaError_t.cudaErrorInvalidDevice, None
    g = STATE.gpus[device]
    return _SUCCESS, cudaDeviceProp(
        name=g.name.encode(),
        major=g.major,
        minor=g.minor,
        totalGlobalMem=g.total_memory,
        multiProcessorCount=g.multiprocessors,
    )


def cudaDriverGetVersion() -> tuple[cudaError_t, int]:  # noqa: N802
    return _SUCCESS, STATE.gpus[0].driver_version


def cudaRuntimeGetVersion() -> tuple[cudaError_t, int]:  # noqa: N802
    return _SUCCESS, STATE.gpus[0].runtime_version


def cudaGetErrorName(error: cudaError_t) -> tuple[cudaError_t, bytes]:  # noqa: N802
    return _SUCCESS, cudaError_t(error).name.encode()


def cudaDeviceSynchronize() -> tuple[cudaError_t]:  # noqa: N802
    sticky = _record("cudaDeviceSynchronize")
    if sticky:
        return (sticky,)
    device = current_device()
    for handle in [h for h, d in STATE.stream_device.items() if d == device]:
        result = cudaStreamSynchronize(cudaStream_t(handle))
        if result[0] != _SUCCESS:
            return result
    return (_SUCCESS,)


# --- memory -----------------------------------------------------------------------------------


def cudaMalloc(size: int) -> tuple[cudaError_t, int]:  # noqa: N802
    sticky = _record("cudaMalloc")
    if sticky:
        return sticky, 0
    if not isinstance(size, int) or size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    with STATE.lock:
        used = sum(len(b) for b in STATE.allocations.values())
        if used + size > STATE.gpu.total_memory:
            return cudaError_t.cudaErrorMemoryAllocation, 0
        ptr = _DEVICE_BASE + next(_ids) * (1 << 32)
        STATE.allocations[ptr] = (ctypes.c_char * size)()
        STATE.allocation_device[ptr] = current_device()
    return _SUCCESS, ptr


def _in_flight(base: int) -> bool:
    ops = [op for queue in STATE.streams.values() for op in queue]
    return any(base in op.uses for op in ops)


def cudaFree(ptr: int) -> tuple[cudaError_t]:  # noqa: N802
    sticky = _record("cudaFree")
    if sticky:
        return (sticky,)
    with STATE.lock:
        if ptr not in STATE.allocations:
            return _fail(cudaError_t.cudaErrorInvalidDevicePointer, f"free of 0x{ptr:x}")
        if _in_flight(ptr):
            # cudaFree synchronizes on a GPU, but a buffer freed under queued work is a bug
            # (the next cudaMalloc can hand the same memory to someone else).
            STATE.errors.append(f"freed 0x{ptr:x} while stream work still uses it")
        del STATE.allocations[ptr]
        STATE.allocation_device.pop(ptr, None)
    return (_SUCCESS,)


def cudaMallocHost(size: int) -> tuple[cudaError_t, int]:  # noqa: N802
    """Page-locked host memory; returns its host address."""
    sticky = _record("cudaMallocHost")
    if sticky:
        return sticky, 0
    if not isinstance(size, int) or size <= 0:
        return cudaError_t.cudaErrorInvalidValue, 0
    buf = (ctypes.c_char * size)()
    with STATE.lock:
        STATE.host_allocations[ctypes.addressof(buf)] = buf
    return _SUCCESS, ctypes.addressof(buf)


def cudaFreeHost(ptr: int) -> tuple[cudaError_t]:  # noqa: N802
    sticky = _record("cudaFreeHost")
    if sticky:
        return (sticky,)
    with STATE.lock:
        if ptr not in STATE.host_allocations:
            return _fail(cudaError_t.cudaErrorInvalidValue, f"cudaFreeHost of 0x{ptr:x}")
        del STATE.host_allocations[ptr]
    return (_SUCCESS,)


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
    sticky = _record("cudaMemcpy")
    if sticky:
        return (sticky,)
    op = _copy_op(dst, src, count, cudaMemcpyKind(kind))
    if isinstance(op, str):
        return _fail(cudaError_t.cudaErrorInvalidValue, op)
    op()
    return (_SUCCESS,)


def cudaMemcpyAsync(  # noqa: N802
    dst: object, src: object, count: int, kind: cudaMemcpyKind, stream: object
) -> tuple[cudaError_t]:
    sticky = _record("cudaMemcpyAsync")
    if sticky:
        return (sticky,)
    op = _copy_op(dst, src, count, cudaMemcpyKind(kind))
    if isinstance(op, str):
        return _fail(cudaError_t.cudaErrorInvalidValue, op)
    host = src if device_region(int(src)) is None else dst  # type: ignore[call-overload]
    if not is_pinned(int(host), count):  # type: ignore[call-overload]
        STATE.pageable_async_copies += 1  # a GPU would stage it and block the caller
    if not enqueue(stream, op, uses=(int(dst), int(src))):  # type: ignore[call-overload]
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {stream!r}")
    return (_SUCCESS,)


# --- streams ----------------------------------------------------------------------------------


def cudaStreamCreate() -> tuple[cudaError_t, cudaStream_t]:  # noqa: N802
    sticky = _record("cudaStreamCreate")
    if sticky:
        return sticky, cudaStream_t(0)
    with STATE.lock:
        handle = _STREAM_BASE + next(_ids) * _ALIGN
        STATE.streams[handle] = []
        STATE.stream_device[handle] = current_device()
    return _SUCCESS, cudaStream_t(handle)


def _drain(handle: int) -> cudaError_t | None:
    """Run the stream's queued work; a faulting kernel poisons its device (sticky)."""
    while True:
        with STATE.lock:
            queue = STATE.streams.get(handle)
            if not queue:
                return None
            op = queue.pop(0)
        try:
            op.run()
        except KernelFault as err:
            device = STATE.stream_device.get(handle, current_device())
            with STATE.lock:
                STATE.sticky[device] = err.code
                STATE.streams[handle].clear()
            STATE.errors.append(f"{err.code.name}: {err}")
            return err.code


def cudaStreamSynchronize(stream: object) -> tuple[cudaError_t]:  # noqa: N802
    sticky = _record("cudaStreamSynchronize")
    if sticky:
        return (sticky,)
    handle = stream_handle(stream)
    if handle is None or (handle != 0 and handle not in STATE.streams):
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {stream!r}")
    fault = _drain(handle)
    return (fault or _SUCCESS,)


def cudaStreamDestroy(stream: object) -> tuple[cudaError_t]:  # noqa: N802
    STATE.calls.append("cudaStreamDestroy")
    handle = stream_handle(stream)
    if handle is None or handle not in STATE.streams:
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, f"stream {stream!r}")
    if not STATE.sticky.get(STATE.stream_device.get(handle, 0)):
        _drain(handle)  # CUDA finishes pending work before releasing the stream
    with STATE.lock:
        del STATE.streams[handle]
        STATE.stream_device.pop(handle, None)
    return (_SUCCESS,)


# --- graphs -----------------------------------------------------------------------------------


def cudaStreamBeginCapture(stream: object, mode: cudaStreamCaptureMode) -> tuple[cudaError_t]:  # noqa: N802
    sticky = _record("cudaStreamBeginCapture")
    if sticky:
        return (sticky,)
    handle = stream_handle(stream)
    if not handle or handle not in STATE.streams or handle in STATE.capturing:
        return _fail(cudaError_t.cudaErrorInvalidValue, f"cannot capture stream {stream!r}")
    if not STATE.gpu.graphs_supported:
        return _fail(cudaError_t.cudaErrorStreamCaptureUnsupported, "graphs unsupported")
    if STATE.streams[handle]:
        return _fail(cudaError_t.cudaErrorInvalidValue, "capture begun with work still queued")
    cudaStreamCaptureMode(mode)
    STATE.capturing[handle] = []
    return (_SUCCESS,)


def cudaStreamEndCapture(stream: object) -> tuple[cudaError_t, cudaGraph_t | None]:  # noqa: N802
    STATE.calls.append("cudaStreamEndCapture")
    handle = stream_handle(stream)
    if handle not in STATE.capturing:
        return cudaError_t.cudaErrorInvalidValue, None
    with STATE.lock:
        ops = STATE.capturing.pop(handle)  # type: ignore[arg-type]
        if ops is None:
            return cudaError_t.cudaErrorStreamCaptureInvalidated, None
        graph = _STREAM_BASE + next(_ids) * _ALIGN
        STATE.graphs[graph] = ops
    return _SUCCESS, cudaGraph_t(graph)


def cudaGraphInstantiate(
    graph: object, flags: int = 0
) -> tuple[cudaError_t, cudaGraphExec_t | None]:  # noqa: N802
    sticky = _record("cudaGraphInstantiate")
    if sticky:
        return sticky, None
    ops = STATE.graphs.get(stream_handle(graph) or -1)
    if ops is None:
        return cudaError_t.cudaErrorInvalidValue, None
    with STATE.lock:
        handle = _STREAM_BASE + next(_ids) * _ALIGN
        STATE.graph_execs[handle] = list(ops)
    return _SUCCESS, cudaGraphExec_t(handle)


def cudaGraphLaunch(graph_exec: object, stream: object) -> tuple[cudaError_t]:  # noqa: N802
    sticky = _record("cudaGraphLaunch")
    if sticky:
        return (sticky,)
    ops = STATE.graph_execs.get(stream_handle(graph_exec) or -1)
    handle = stream_handle(stream)
    if ops is None or not handle or handle not in STATE.streams:
        return _fail(cudaError_t.cudaErrorInvalidResourceHandle, "bad graph or stream")
    with STATE.lock:
        STATE.streams[handle].extend(ops)
        STATE.graph_launches += 1
    return (_SUCCESS,)


def cudaGraphExecDestroy(graph_exec: object) -> tuple[cudaError_t]:  # noqa: N802
    if STATE.graph_execs.pop(stream_handle(graph_exec) or -1, None) is None:
        return _fail(cudaError_t.cudaErrorInvalidValue, "unknown graph exec")
    return (_SUCCESS,)


def cudaGraphDestroy(graph: object) -> tuple[cudaError_t]:  # noqa: N802
    if STATE.graphs.pop(stream_handle(graph) or -1, None) is None:
        return _fail(cudaError_t.cudaErrorInvalidValue, "unknown graph")
    return (_SUCCESS,)
