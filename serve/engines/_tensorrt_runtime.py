"""Running a deserialized TensorRT engine from several threads.

One ``ICudaEngine`` is shared; each concurrent worker gets its own execution
context, CUDA stream, pinned and device buffers and CUDA graphs (a
:class:`~serve.engines._tensorrt_slot.Slot`), handed out so that two ``infer``
calls never touch the same context: a context holds the input shapes of the
batch in flight, so sharing one corrupts results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._tensorrt_common import TensorRTDeviceFault, TensorRTError, cuda_call
from serve.engines._tensorrt_slot import Slot, TensorInfo
from serve.engines.base import EngineSpec
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.tensorrt")

_CLOSE_TIMEOUT_S = 30.0


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


class ExecutionPool:
    """``workers`` slots over one engine; :meth:`run` borrows one for the call.

    A sticky CUDA fault in any call breaks the whole pool (the CUDA context is lost, so
    every slot is): the call raises :class:`TensorRTDeviceFault`, so do waiting and later
    calls, and :attr:`healthy` turns False. :meth:`close` wakes waiters, waits (bounded)
    for calls in flight, and never frees the buffers of a call still running: such a
    slot is freed by its own call on the way out.
    """

    def __init__(
        self,
        trt: ModuleType,
        cudart: ModuleType,
        engine: Any,
        spec: EngineSpec,
        device: int = 0,
        use_graphs: bool = True,
    ) -> None:
        if spec.workers < 1:
            raise ConfigError(f"workers must be >= 1, got {spec.workers}")
        self.tensors = describe_io(trt, engine, spec)
        self._cudart, self._device, self._spec = cudart, device, spec
        self._cond = threading.Condition()
        self._idle: list[Slot] = []
        self._busy = 0
        self._closed = False
        self._fault: TensorRTDeviceFault | None = None
        try:
            for _ in range(spec.workers):
                self._idle.append(Slot(cudart, engine, spec, self.tensors, use_graphs))
        except BaseException:
            for slot in self._idle:
                slot.free()
            raise
        self._slots = tuple(self._idle)

    @property
    def healthy(self) -> bool:
        return self._fault is None

    @property
    def graph_runs(self) -> int:
        """Calls served by replaying a CUDA graph (for tests and the GPU check)."""
        return sum(slot.graph_runs for slot in self._slots)

    def _borrow(self) -> Slot:
        with self._cond:
            while not self._idle and not self._closed and self._fault is None:
                self._cond.wait()
            if self._fault is not None:
                raise TensorRTDeviceFault(
                    f"engine for {self._spec.model}/{self._spec.version} is broken: {self._fault}"
                )
            if self._closed:
                raise TensorRTError(f"engine for {self._spec.model}/{self._spec.version} is closed")
            self._busy += 1
            return self._idle.pop()

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """One host batch of a built batch size on a free slot."""
        return self._on_slot(lambda slot: slot.run(batch))

    def run_device(self, pointer: int, rows: int, size: int, row_bytes: int) -> dict[str, np.ndarray]:
        """One device-resident batch on a free slot, padded to built size ``size``
        (:meth:`Slot.run_device`)."""
        return self._on_slot(lambda slot: slot.run_device(pointer, rows, size, row_bytes))

    def _on_slot(self, call: Callable[[Slot], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        slot = self._borrow()
        faulted = False
        try:
            # The current device is per host thread, and callers' threads start on device 0.
            cuda_call(
                self._cudart,
                self._cudart.cudaSetDevice(self._device),
                f"cudaSetDevice({self._device})",
            )
            return call(slot)
        except TensorRTDeviceFault as err:
            faulted = True
            logger.critical(
                "sticky CUDA fault in %s/%s on device %d: %s; the engine is unusable and the "
                "replica must be replaced", self._spec.model, self._spec.version, self._device, err,
            )  # fmt: skip
            with self._cond:
                self._fault = self._fault or err
            raise
        finally:
            with self._cond:
                self._busy -= 1
                keep = not self._closed and not faulted
                if keep:
                    self._idle.append(slot)
                self._cond.notify_all()
            if not keep:  # closed while this call ran, or poisoned: nobody else will use it
                slot.free()

    def close(self, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
        """Refuse new calls, wake waiters, wait up to ``timeout_s`` for calls in flight, then
        free idle slots (a call still running frees its own slot when it returns)."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            deadline = time.monotonic() + timeout_s
            while self._busy and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            idle, self._idle = self._idle, []
            if self._busy:
                logger.error(
                    "closing the engine for %s/%s with %d call(s) still in flight; their "
                    "buffers are freed when they return", self._spec.model, self._spec.version,
                    self._busy,
                )  # fmt: skip
        for slot in idle:
            slot.free()
