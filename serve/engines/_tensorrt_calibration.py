"""INT8 calibration for TensorRT 10.x (implicit quantization).

TensorRT deprecated the calibrator API in 10.1 and removed it in 11; explicitly
quantized (Q/DQ) ONNX models are the way forward and need none of this. It stays
for TensorRT 10.x, fed by a version's ``calibration/`` images, which are distinct
from the ``validation/`` images the accuracy guard grades the engine on.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._cache_stores import write_atomic
from serve.engines._tensorrt_common import cuda_call
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.tensorrt")


def rebatch(
    first: np.ndarray | None, rest: Iterator[np.ndarray], size: int
) -> Iterator[np.ndarray]:
    """Yield batches of exactly ``size`` rows; the last is padded by repeating its final row
    (calibration data is precious, dropping the remainder would waste it)."""
    if first is None:
        return
    pending: list[np.ndarray] = []
    count = 0
    for batch in itertools.chain([first], rest):
        pending.append(np.asarray(batch))
        count += len(batch)
        while count >= size:
            joined = np.concatenate(pending)
            yield joined[:size]
            pending, count = [joined[size:]], count - size
    if count:
        joined = np.concatenate(pending)
        yield np.concatenate([joined, np.repeat(joined[-1:], size - count, axis=0)])


class _CalibrationFeed:
    """Calibration state: one device buffer, the batch iterator and the cache file."""

    def __init__(
        self,
        cudart: ModuleType,
        batches: Iterator[np.ndarray],
        shape: tuple[int, ...],
        dtype: np.dtype,
        cache_path: Path | None,
    ) -> None:
        self._cudart, self._batches, self._cache_path = cudart, batches, cache_path
        self.shape, self.dtype = shape, dtype
        self.nbytes = int(np.prod(shape)) * dtype.itemsize
        self._device: int | None = None
        self._host: np.ndarray | None = None  # kept alive until TensorRT has read it
        self.batches_fed = 0
        self.error: Exception | None = None

    def next_batch(self) -> list[int] | None:
        # Called from TensorRT's C++ build loop, where a Python exception cannot travel:
        # keep it, end calibration, and let build_plan raise it afterwards.
        try:
            return self._next_batch()
        except Exception as err:  # noqa: BLE001 - re-raised by build_plan
            self.error = err
            return None

    def _next_batch(self) -> list[int] | None:
        cudart = self._cudart
        batch = next(self._batches, None)
        if batch is None:
            return None
        if batch.shape != self.shape or batch.dtype != self.dtype:
            raise ConfigError(
                f"calibration batch is {batch.shape} {batch.dtype}, expected {self.shape} {self.dtype}"
            )
        if self._device is None:
            self._device = cuda_call(
                cudart, cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})"
            )
        self._host = np.ascontiguousarray(batch)
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_call(
            cudart,
            cudart.cudaMemcpy(self._device, self._host.ctypes.data, self.nbytes, kind),
            "cudaMemcpy(calibration batch)",
        )
        self.batches_fed += 1
        return [int(self._device)]

    def read_cache(self) -> bytes | None:
        if self._cache_path is not None and self._cache_path.is_file():
            logger.info("using INT8 calibration cache %s", self._cache_path)
            return self._cache_path.read_bytes()
        return None

    def write_cache(self, cache: object) -> None:
        if self._cache_path is not None:
            write_atomic(self._cache_path, bytes(cache))  # type: ignore[call-overload]

    def free(self) -> None:
        if self._device is not None:
            cuda_call(
                self._cudart, self._cudart.cudaFree(self._device), "cudaFree(calibration buffer)"
            )
            self._device = None


def make_calibrator(
    trt: ModuleType,
    cudart: ModuleType,
    batches: Iterator[np.ndarray],
    batch_size: int,
    row_shape: tuple[int, ...],
    dtype: np.dtype,
    cache_path: Path | None,
) -> Any:
    """An ``IInt8EntropyCalibrator2`` feeding ``batches`` (of ``batch_size`` rows) to TensorRT."""
    feed = _CalibrationFeed(cudart, batches, (batch_size, *row_shape), dtype, cache_path)

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)  # pybind requires the explicit base init
            self.feed = feed

        def get_batch_size(self) -> int:
            return batch_size

        def get_batch(self, names: list[str], *_: object) -> list[int] | None:
            return feed.next_batch()

        def read_calibration_cache(self) -> bytes | None:
            return feed.read_cache()

        def write_calibration_cache(self, cache: object) -> None:
            feed.write_cache(cache)

        @property
        def error(self) -> Exception | None:
            return feed.error

        def free(self) -> None:
            feed.free()

    return _Calibrator()
