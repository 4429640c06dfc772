"""Building a serialized TensorRT engine from ONNX (TensorRT 10 API).

The ``trt`` and ``cudart`` modules are passed in by :mod:`serve.engines.tensorrt`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._cache_stores import write_atomic
from serve.engines._tensorrt_common import cuda_call, trt_logger
from serve.engines.base import EngineSpec
from serve.engines.cache import EngineBuildError
from serve.model_config import Precision
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.tensorrt")


def build_plan(
    trt: ModuleType,
    cudart: ModuleType,
    spec: EngineSpec,
    onnx_bytes: bytes,
    *,
    precision: Precision,
    calibration_batches: Iterable[np.ndarray] | None,
    calibration_cache_path: Path | None,
    timing_cache_path: Path | None,
    workspace_bytes: int,
) -> bytes:
    """Parse ``onnx_bytes`` and build a plan for ``spec`` at ``precision``; see
    :func:`serve.engines.tensorrt.build_serialized_engine`."""
    log = trt_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(0)  # TensorRT 10: networks are always explicit-batch
    parser = trt.OnnxParser(network, log)
    if not parser.parse(onnx_bytes):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {spec.model}/{spec.version} ONNX: {errors}")
    row_shape = _check_network(network, spec)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    profile = builder.create_optimization_profile()
    sizes = spec.batch_sizes
    # OPT = the largest size: under load the dynamic batcher fills batches, and that is
    # where kernel choice pays; small batches are cheap whichever kernels run them.
    profile.set_shape(
        spec.input_name, (sizes[0], *row_shape), (sizes[-1], *row_shape), (sizes[-1], *row_shape)
    )
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"invalid optimization profile for batch sizes {sizes}")
    calibrator = _set_precision(
        trt,
        cudart,
        builder,
        config,
        spec,
        row_shape,
        precision,
        calibration_batches,
        calibration_cache_path,
    )
    if timing_cache_path is not None:
        _attach_timing_cache(config, timing_cache_path)
    try:
        plan = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()
    if calibrator is not None and calibrator.error is not None:
        raise calibrator.error
    if plan is None:
        raise EngineBuildError(
            f"TensorRT could not build {spec.model}/{spec.version} at {precision.value} "
            "(its errors are logged above under serve.engines.tensorrt)"
        )
    if timing_cache_path is not None:
        _save_timing_cache(config, timing_cache_path)
    return bytes(plan)


def _check_network(network: Any, spec: EngineSpec) -> tuple[int, ...]:
    """The input's non-batch shape, after checking the network against ``spec``."""
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    if spec.input_name not in inputs or len(inputs) != 1:
        raise ConfigError(
            f"model {spec.model}/{spec.version} must have exactly one input named "
            f"{spec.input_name!r}; it has {sorted(inputs)}"
        )
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    missing = [n for n in spec.output_names if n not in outputs]
    if missing:
        raise ConfigError(
            f"model {spec.model}/{spec.version} has no outputs {missing} (has {sorted(outputs)})"
        )
    dims = tuple(inputs[spec.input_name].shape)
    if len(dims) != len(spec.input_shape) + 1:
        raise ConfigError(
            f"input {spec.input_name} has rank {len(dims)}, config implies {len(spec.input_shape) + 1}"
        )
    if dims[0] != -1 and spec.batch_sizes != (dims[0],):
        raise ConfigError(
            f"model {spec.model}/{spec.version} has a fixed batch dimension {dims[0]} but engine "
            f"batch sizes {spec.batch_sizes}; export the ONNX with a dynamic batch axis"
        )
    for got, want in zip(dims[1:], spec.input_shape, strict=True):
        if got not in (-1, want):
            raise ConfigError(
                f"input {spec.input_name} of {spec.model}/{spec.version} has shape {dims}, "
                f"config says (N, {', '.join(map(str, spec.input_shape))})"
            )
    return tuple(spec.input_shape)


def _set_precision(
    trt: ModuleType,
    cudart: ModuleType,
    builder: Any,
    config: Any,
    spec: EngineSpec,
    row_shape: tuple[int, ...],
    precision: Precision,
    batches: Iterable[np.ndarray] | None,
    cache_path: Path | None,
) -> Any:
    # platform_has_fast_* is deprecated in late 10.x releases; absent means "assume yes".
    fast_fp16 = bool(getattr(builder, "platform_has_fast_fp16", True))
    fast_int8 = bool(getattr(builder, "platform_has_fast_int8", True))
    where = f"{spec.model}/{spec.version}"
    if precision is Precision.FP32:
        return None
    if precision is Precision.FP16:
        if not fast_fp16:
            raise ConfigError(
                f"precision fp16 requested for {where} but this GPU has no fast FP16; use fp32"
            )
        config.set_flag(trt.BuilderFlag.FP16)
        return None
    if not fast_int8:
        raise ConfigError(f"precision int8 requested for {where} but this GPU has no fast INT8")
    has_cache = cache_path is not None and cache_path.is_file()
    if batches is None and not has_cache:
        raise ConfigError(
            f"precision int8 for {where} needs calibration batches (preprocessed images) "
            f"or an existing calibration cache (looked for {cache_path})"
        )
    config.set_flag(trt.BuilderFlag.INT8)
    if fast_fp16:
        config.set_flag(
            trt.BuilderFlag.FP16
        )  # layers without INT8 kernels fall back to FP16, not FP32
    it: Iterator[np.ndarray] = iter(batches or ())
    first = next(it, None)
    calib_batch = len(first) if first is not None else spec.batch_sizes[-1]
    calibrator = make_calibrator(
        trt,
        cudart,
        _rebatch(first, it, calib_batch),
        calib_batch,
        row_shape,
        np.dtype(spec.input_dtype),
        cache_path,
    )
    config.int8_calibrator = calibrator
    # Dynamic-shape networks calibrate at the OPT shape of a dedicated calibration profile.
    calib_profile = builder.create_optimization_profile()
    shape = (calib_batch, *row_shape)
    calib_profile.set_shape(spec.input_name, shape, shape, shape)
    if not config.set_calibration_profile(calib_profile):
        raise EngineBuildError(f"TensorRT rejected the calibration profile {shape}")
    return calibrator


def _rebatch(
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


def _attach_timing_cache(config: Any, path: Path) -> None:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # Made on another GPU or TensorRT version: useless here, and harmless to replace.
        logger.warning("timing cache %s does not fit this device; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        write_atomic(path, bytes(cache.serialize()))
