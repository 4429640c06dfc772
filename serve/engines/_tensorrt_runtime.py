"""Running a deserialized TensorRT engine from several threads.

One ``ICudaEngine`` is shared; each concurrent worker gets its own execution
context, CUDA stream and device buffers (a :class:`_Slot`), handed out from a
queue so that two ``infer`` calls never touch the same context: a context holds
the input shapes of the batch in flight, so sharing one corrupts results.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._tensorrt_common import TensorRTError, cuda_call
from serve.engines.base import EngineSpec
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.tensorrt")

_CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: np.dtype
    is_input: bool


def describe_io(trt: ModuleType, engine: Any, spec: EngineSpec) -> list[TensorInfo]:
    """The engine's I/O tensors, after checking them against ``spec``."""
    tensors = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
        tensors.append(
            TensorInfo(name, np.dtype(trt.nptype(engine.get_tensor_dtype(name))), is_input)
        )
    inputs = [t for t in tensors if t.is_input]
    where = f"engine for {spec.model}/{spec.version}"
    if [t.name for t in inputs] != [spec.input_name]:
        raise ConfigError(
            f"{where} has inputs {[t.name for t in inputs]}, expected [{spec.input_name!r}]"
        )
    if inputs[0].dtype != np.dtype(spec.input_dtype):
        raise ConfigError(f"{where} takes {inputs[0].dtype} input, config says {spec.input_dtype}")
    outputs = {t.name for t in tensors if not t.is_input}
    missing = [n for n in spec.output_names if n not in outputs]
    if missing:
        raise ConfigError(f"{where} has no outputs {missing} (has {sorted(outputs)})")
    lo, _, hi = (tuple(d) for d in engine.get_tensor_profile_shape(spec.input_name, 0))
    if lo[0] > spec.batch_sizes[0] or hi[0] < spec.batch_sizes[-1] or hi[1:] != spec.input_shape:
        raise ConfigError(
            f"{where} was built for input shapes {lo}..{hi}, which do not cover batch sizes "
            f"{spec.batch_sizes} of {spec.input_shape}"
        )
    return tensors


class _Slot:
    """One worker's execution context, stream and device buffers (sized for the max batch)."""

    def __init__(
        self, cudart: ModuleType, engine: Any, spec: EngineSpec, tensors: list[TensorInfo]
    ) -> None:
        self._cudart = cudart
        self._spec = spec
        self._tensors = tensors
        self._buffers: dict[str, tuple[int, int]] = {}
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
        for t in self._tensors:
            shape = tuple(self.context.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise ConfigError(
                    f"output {t.name} of {spec.model}/{spec.version} has a data-dependent shape "
                    f"{shape}; only static output shapes are supported"
                )
            nbytes = max(int(np.prod(shape)) * t.dtype.itemsize, 1)
            ptr = cuda_call(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes}) for {t.name}")
            self._buffers[t.name] = (ptr, nbytes)
            # Buffers never move, so addresses are bound once instead of on every call.
            if not self.context.set_tensor_address(t.name, ptr):
                raise TensorRTError(f"set_tensor_address failed for {t.name}")

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch whose size is inside the profile; returns every output."""
        cudart, spec = self._cudart, self._spec
        if not self.context.set_input_shape(spec.input_name, batch.shape):
            raise TensorRTError(
                f"input shape {batch.shape} is outside the optimization profile of "
                f"{spec.model}/{spec.version} (batch sizes {spec.batch_sizes})"
            )
        host_in = np.ascontiguousarray(batch)  # must stay alive until the stream is synchronized
        ptr, capacity = self._buffers[spec.input_name]
        if host_in.nbytes > capacity:
            raise TensorRTError(
                f"batch of {host_in.nbytes} bytes exceeds the {capacity}-byte input buffer"
            )
        h2d, d2h = (
            cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
            cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
        )
        cuda_call(
            cudart,
            cudart.cudaMemcpyAsync(ptr, host_in.ctypes.data, host_in.nbytes, h2d, self.stream),
            "cudaMemcpyAsync(input)",
        )
        if not self.context.execute_async_v3(int(self.stream)):
            self._drain()
            raise TensorRTError(
                f"execute_async_v3 failed for {spec.model}/{spec.version} batch {batch.shape}"
            )
        outputs: dict[str, np.ndarray] = {}
        for t in self._tensors:
            if t.is_input:
                continue
            host = np.empty(tuple(self.context.get_tensor_shape(t.name)), dtype=t.dtype)
            out_ptr, _ = self._buffers[t.name]
            cuda_call(
                cudart,
                cudart.cudaMemcpyAsync(host.ctypes.data, out_ptr, host.nbytes, d2h, self.stream),
                f"cudaMemcpyAsync({t.name})",
            )
            outputs[t.name] = host
        cuda_call(cudart, cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        del host_in
        return outputs

    def _drain(self) -> None:
        """Best effort: finish queued copies so the slot is clean for the next caller."""
        err, *_ = self._cudart.cudaStreamSynchronize(self.stream)
        if err != self._cudart.cudaError_t.cudaSuccess:
            logger.error("cudaStreamSynchronize after a failed execution: %s", err)

    def free(self) -> None:
        cudart = self._cudart
        for name, (ptr, _) in self._buffers.items():
            err, *_ = cudart.cudaFree(ptr)
            if err != cudart.cudaError_t.cudaSuccess:
                logger.error("cudaFree of %s failed: %s", name, err)
        self._buffers.clear()
        if self.stream is not None:
            cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None  # TensorRT frees a context when its last reference goes


class ExecutionPool:
    """``workers`` slots over one engine; :meth:`run` borrows one for the call."""

    def __init__(
        self, trt: ModuleType, cudart: ModuleType, engine: Any, spec: EngineSpec, device: int = 0
    ) -> None:
        if spec.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {spec.workers}")
        self.tensors = describe_io(trt, engine, spec)
        self._cudart, self._device = cudart, device
        self._slots: list[_Slot] = []
        self._free: queue.Queue[_Slot] = queue.Queue()
        try:
            for _ in range(spec.workers):
                slot = _Slot(cudart, engine, spec, self.tensors)
                self._slots.append(slot)
                self._free.put(slot)
        except BaseException:
            for slot in self._slots:
                slot.free()
            raise
        self._closed = False

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self._closed:
            raise TensorRTError("engine is closed")
        slot = self._free.get()
        try:
            # The current device is per host thread; callers' threads start on device 0.
            if self._device:
                cuda_call(self._cudart, self._cudart.cudaSetDevice(self._device), "cudaSetDevice")
            return slot.run(batch)
        finally:
            self._free.put(slot)

    def close(self) -> None:
        """Wait for in-flight calls (bounded), then free every slot."""
        if self._closed:
            return
        self._closed = True
        for _ in self._slots:
            try:
                self._free.get(timeout=_CLOSE_TIMEOUT_S)
            except queue.Empty:
                logger.error("TensorRT engine closed with a call still in flight")
                break
        for slot in self._slots:
            slot.free()
        self._slots.clear()
