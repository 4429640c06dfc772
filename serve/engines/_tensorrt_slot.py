"""One worker's share of a TensorRT engine: execution context, stream, buffers, graphs.

Host buffers are page-locked (``cudaMallocHost``): a copy from pageable memory
is staged by the driver and blocks the calling thread, while a copy from pinned
memory is a real DMA that runs asynchronously on the worker's stream, so one
worker's copies overlap another worker's kernels.

Batch sizes are a small fixed set (the engine's built sizes), so each gets a
CUDA graph: the first run at a size is a plain ``execute_async_v3`` (it also
flushes TensorRT's deferred shape updates, which TensorRT requires before a
capture), and right after it the same enqueue is captured into a graph that
later runs replay with one launch. Engines that cannot be captured (some plugins,
data-dependent shapes) fall back to plain enqueues, logged once.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._tensorrt_common import TensorRTError, cuda_call, error_name
from serve.engines.base import EngineSpec
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.tensorrt")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    is_input: bool


@dataclass(slots=True)
class _Buffer:
    device: int
    host: int  # page-locked
    nbytes: int
    view: np.ndarray  # uint8 view over the pinned host bytes


class Slot:
    """One worker's execution context, stream and buffers (sized for the max batch)."""

    def __init__(
        self,
        cudart: ModuleType,
        engine: Any,
        spec: EngineSpec,
        tensors: list[TensorInfo],
        use_graphs: bool = True,
    ) -> None:
        self._cudart = cudart
        self._spec = spec
        self._tensors = tensors
        self._buffers: dict[str, _Buffer] = {}
        self._graphs: dict[int, Any] = {}  # batch size -> cudaGraphExec_t
        self._shapes: dict[int, dict[str, tuple[int, ...]]] = {}  # batch size -> output shapes
        self._current: int | None = None  # batch size the context's input shape is set to
        self.use_graphs = use_graphs
        self.graph_runs = 0
        self.stream: Any = None
        self.context = engine.create_execution_context()
        if self.context is None:
            raise TensorRTError(
                f"cannot create an execution context for {spec.model}/{spec.version} (device memory?)"
            )
        try:
            self._allocate()
        except BaseException:
            self.free()
            raise

    def _allocate(self) -> None:
        cudart, spec = self._cudart, self._spec
        self.stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        max_shape = (spec.max_batch_size, *spec.input_shape)
        if not self.context.set_input_shape(spec.input_name, max_shape):
            raise TensorRTError(f"engine rejects its own max input shape {max_shape}")
        self._current = spec.max_batch_size
        for t in self._tensors:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise ConfigError(
                    f"output {t.name} of {spec.model}/{spec.version} has a data-dependent shape "
                    f"{shape}; only static output shapes are supported"
                )
            nbytes = max(int(np.prod(shape)) * t.dtype.itemsize, 1)
            ptr = cuda_call(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {t.name}")
            try:
                host = cuda_call(
                    cudart, cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes}) for {t.name}"
                )
            except BaseException:
                cudart.cudaFree(ptr)
                raise
            raw = (ctypes.c_char * nbytes).from_address(host)
            self._buffers[t.name] = _Buffer(ptr, host, nbytes, np.frombuffer(raw, np.uint8))
            # Buffers never move, so addresses are bound once instead of on every call.
            if not self.context.set_tensor_address(t.name, ptr):
                raise TensorRTError(f"set_tensor_address failed for {t.name}")

    def _set_batch(self, n: int) -> dict[str, tuple[int, ...]]:
        spec = self._spec
        if self._current != n:
            if not self.context.set_input_shape(spec.input_name, (n, *spec.input_shape)):
                raise TensorRTError(
                    f"input shape {(n, *spec.input_shape)} is outside the optimization profile "
                    f"of {spec.model}/{spec.version} (batch sizes {spec.batch_sizes})"
                )
            self._current = n
        if n not in self._shapes:
            self._shapes[n] = {
                t.name: tuple(self.context.get_tensor_shape(t.name))
                for t in self._tensors
                if not t.is_input
            }
        return self._shapes[n]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one host batch whose size is a built batch size; returns every output."""
        cudart = self._cudart
        out_shapes = self._set_batch(len(batch))
        buf = self._input_buffer(batch.nbytes)
        # The one host-side copy: into page-locked memory, from where the DMA is async.
        np.copyto(buf.view[: batch.nbytes].view(batch.dtype).reshape(batch.shape), batch)
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(
            cudart,
            cudart.cudaMemcpyAsync(buf.device, buf.host, batch.nbytes, h2d, self.stream),
            "cudaMemcpyAsync(input)",
        )
        return self._execute(len(batch), out_shapes)

    def run_device(self, pointer: int, rows: int, size: int, row_bytes: int) -> dict[str, np.ndarray]:
        """Run ``rows`` rows of ``row_bytes`` each at device address ``pointer`` (written by
        work already finished) as a batch of built size ``size``: copied device to device
        into the bound input, the last row repeated as padding; returns every output."""
        cudart = self._cudart
        out_shapes = self._set_batch(size)
        buf = self._input_buffer(size * row_bytes)
        d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        # Copied, not bound: a captured CUDA graph replays the input address it was captured with.
        copies = [(buf.device, pointer, rows * row_bytes)]
        last = pointer + (rows - 1) * row_bytes
        copies += [(buf.device + i * row_bytes, last, row_bytes) for i in range(rows, size)]
        for dst, src, nbytes in copies:
            cuda_call(
                cudart,
                cudart.cudaMemcpyAsync(dst, src, nbytes, d2d, self.stream),
                "cudaMemcpyAsync(input, device to device)",
            )
        return self._execute(size, out_shapes)

    def _input_buffer(self, nbytes: int) -> _Buffer:
        buf = self._buffers[self._spec.input_name]
        if nbytes > buf.nbytes:
            raise TensorRTError(f"batch of {nbytes} bytes exceeds the {buf.nbytes}-byte buffer")
        return buf

    def _execute(self, n: int, out_shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """Enqueue the engine at batch size ``n`` behind the input copy, copy the outputs
        back, wait for the stream; capture a graph for ``n`` after its first plain run."""
        cudart, spec = self._cudart, self._spec
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        graph = self._graphs.get(n)
        if graph is not None:
            cuda_call(cudart, cudart.cudaGraphLaunch(graph, self.stream), "cudaGraphLaunch")
            self.graph_runs += 1
        elif not self.context.execute_async_v3(int(self.stream)):
            self._drain()
            raise TensorRTError(f"execute_async_v3 failed for {spec.model}/{spec.version} batch of {n}")
        views: dict[str, np.ndarray] = {}
        for t in self._tensors:
            if t.is_input:
                continue
            out = self._buffers[t.name]
            shape = out_shapes[t.name]
            nbytes = int(np.prod(shape)) * t.dtype.itemsize
            cuda_call(
                cudart,
                cudart.cudaMemcpyAsync(out.host, out.device, nbytes, d2h, self.stream),
                f"cudaMemcpyAsync({t.name})",
            )
            views[t.name] = out.view[:nbytes].view(t.dtype).reshape(shape)
        cuda_call(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        # Copied out: the pinned buffers belong to the slot and the next call reuses them.
        outputs = {name: view.copy() for name, view in views.items()}
        if graph is None and self.use_graphs:
            self._capture(n)
        return outputs

    def _capture(self, n: int) -> None:
        """Capture the enqueue at batch size ``n`` (just run, so TensorRT's deferred updates
        for this shape are flushed) into a CUDA graph; on failure use plain enqueues."""
        cudart, spec = self._cudart, self._spec
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        (err,) = cudart.cudaStreamBeginCapture(self.stream, mode)
        if err != cudart.cudaError_t.cudaSuccess:
            self._no_graphs(f"cudaStreamBeginCapture: {error_name(cudart, err)}")
            return
        enqueued = self.context.execute_async_v3(int(self.stream))
        err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not enqueued or err != cudart.cudaError_t.cudaSuccess or graph is None:
            if graph is not None:
                cudart.cudaGraphDestroy(graph)
            self._no_graphs(f"capture at batch {n}: {error_name(cudart, err)}")
            return
        try:
            self._graphs[n] = cuda_call(
                cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate"
            )
        except TensorRTError as exc:
            self._no_graphs(str(exc))
        finally:
            cudart.cudaGraphDestroy(graph)
        logger.debug("captured a CUDA graph for %s/%s at batch %d", spec.model, spec.version, n)

    def _no_graphs(self, why: str) -> None:
        if self.use_graphs:
            logger.info(
                "CUDA graphs unavailable for %s/%s (%s); using plain enqueues",
                self._spec.model, self._spec.version, why,
            )  # fmt: skip
        self.use_graphs = False

    def _drain(self) -> None:
        """Finish queued copies so the slot is clean for the next caller; a sticky error
        surfaces here as :class:`TensorRTDeviceFault`."""
        cuda_call(
            self._cudart,
            self._cudart.cudaStreamSynchronize(self.stream),
            "cudaStreamSynchronize after a failed execution",
        )

    def free(self) -> None:
        """Release graphs, buffers and the stream; errors are logged (a slot is freed on the
        way out, also after a device fault, when every CUDA call fails)."""
        cudart = self._cudart
        for graph in self._graphs.values():
            cudart.cudaGraphExecDestroy(graph)
        self._graphs.clear()
        if self.stream is not None:  # destroying the stream first waits for its work
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        for name, buf in self._buffers.items():
            for what, result in (
                ("cudaFree", cudart.cudaFree(buf.device)),
                ("cudaFreeHost", cudart.cudaFreeHost(buf.host)),
            ):
                if result[0] != cudart.cudaError_t.cudaSuccess:
                    logger.debug("%s of %s: %s", what, name, error_name(cudart, result[0]))
        self._buffers.clear()
        self.context = None  # TensorRT frees a context when its last reference goes
