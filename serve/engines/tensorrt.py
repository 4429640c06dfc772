"""TensorRT backend (TensorRT 10.x or 11.x, cuda-python), the only module importing
``tensorrt``/``cuda``.

Both are imported when an engine is built or loaded, never at import of this
module, so CPU-only machines import the package fine and fail only if they ask
for TensorRT, with :class:`TensorRTUnavailableError` and the install hint.

Loading goes through the engine cache (:mod:`serve.engines.cache`): a plan is
built once per (model and its weights, TensorRT build, CUDA runtime, GPU,
precision, batch profile, compatibility options) on the GPU it is for, and then
deserialized from memory, local disk or ``gs://`` by every other replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._onnx_info import OnnxInfo, inspect_model
from serve.engines._tensorrt_build import build_plan
from serve.engines._tensorrt_common import (
    INSTALL_HINT,
    TensorRTDeviceFault,
    TensorRTError,
    TensorRTUnavailableError,
    UnsupportedPrecisionError,
    check_supported,
    cuda_call,
    init_plugins,
    tensorrt_cuda_version,
    tensorrt_full_version,
    trt_logger,
    version_string,
)
from serve.engines._tensorrt_identity import (
    DeviceIdentity,
    engine_cache_key,
    timing_cache_file,
)
from serve.engines._tensorrt_runtime import ExecutionPool
from serve.engines.base import EngineSpec
from serve.engines.buffers import buffer_of
from serve.engines.cache import CacheReport, EngineCache, IncompatibleEngineError
from serve.model_config import Precision

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 2 * 1024**3

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "DeviceIdentity",
    "TensorRTDeviceFault",
    "TensorRTEngine",
    "TensorRTError",
    "TensorRTUnavailableError",
    "UnsupportedPrecisionError",
    "build_serialized_engine",
    "device_identity",
    "engine_cache_key",
    "timing_cache_file",
]


def _import_trt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed ({err}); {INSTALL_HINT}"
        ) from err
    check_supported(trt)
    return trt


def _import_cudart() -> ModuleType:
    try:  # cuda-python >= 12.6 layout; the old one below warns as deprecated there
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as err:
            raise TensorRTUnavailableError(
                f"cuda-python is not installed ({err}); {INSTALL_HINT}"
            ) from err
    return cudart


def device_identity(device: int = 0) -> DeviceIdentity:
    """GPU name and compute capability of ``device``, TensorRT's and CUDA's versions.

    Raises:
        TensorRTUnavailableError: TensorRT or cuda-python missing.
        TensorRTError: a CUDA call failed (no GPU, bad device index).
    """
    trt, cudart = _import_trt(), _import_cudart()
    props = cuda_call(
        cudart, cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})"
    )
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    driver = cuda_call(cudart, cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    return DeviceIdentity(
        gpu_name=name.rstrip("\x00").strip(),
        compute_capability=(int(props.major), int(props.minor)),
        tensorrt_version=tensorrt_full_version(trt),
        cuda_runtime_version=tensorrt_cuda_version(trt, cudart),
        cuda_driver_version=version_string(driver),
        device_index=device,
    )


def build_serialized_engine(
    spec: EngineSpec,
    onnx_bytes: bytes | None = None,
    *,
    precision: Precision,
    calibration_batches: Iterable[np.ndarray] | None = None,
    calibration_cache_path: Path | None = None,
    timing_cache_path: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    device: int = 0,
    model: OnnxInfo | None = None,
) -> bytes:
    """Build a TensorRT plan for ``spec`` on GPU ``device``.

    Args:
        spec: Model, ONNX path, input name/shape/dtype and batch sizes (the profile is
            ``min = batch_sizes[0]``, ``opt = max = batch_sizes[-1]``).
        onnx_bytes: The model's bytes; None parses ``spec.onnx_path`` from the file. Either
            way the parser knows the path, so external weights beside it load.
        precision: ``fp16``/``int8`` need a GPU with fast FP16/INT8 (else ``ConfigError``);
            on TensorRT 11 they need an FP16 or Q/DQ model (else
            :class:`UnsupportedPrecisionError`).
        calibration_batches: Preprocessed input batches for INT8 calibration (TensorRT 10.x,
            FP32 models).
        calibration_cache_path: Read instead of calibrating when present; written after.
        timing_cache_path: This model's timing cache on this GPU (:func:`timing_cache_file`).
        workspace_bytes: Builder workspace memory pool limit.
        device: The GPU to build for (made current for the build).
        model: :func:`~serve.engines._onnx_info.inspect_model` of the file, when known.

    Raises:
        TensorRTUnavailableError: TensorRT or cuda-python missing.
        EngineBuildError: the parser or the builder failed (their errors are logged).
        ConfigError: the model does not fit the spec, or the precision cannot be honoured.
    """
    trt, cudart = _import_trt(), _import_cudart()
    if model is None:
        model = inspect_model(Path(spec.onnx_path))
    return build_plan(
        trt,
        cudart,
        spec,
        model,
        precision=precision,
        calibration_batches=calibration_batches,
        calibration_cache_path=calibration_cache_path,
        timing_cache_path=timing_cache_path,
        workspace_bytes=workspace_bytes,
        device=device,
        onnx_bytes=onnx_bytes,
    )


class TensorRTEngine:
    """A deserialized TensorRT engine behind the :class:`~serve.engines.base.Engine` protocol.

    After a sticky CUDA fault :attr:`healthy` is False and every call raises
    :class:`TensorRTDeviceFault` (an :class:`~serve.engines.base.EngineFault`).
    """

    def __init__(
        self,
        spec: EngineSpec,
        runtime: object,
        engine: object,
        pool: ExecutionPool,
        identity: DeviceIdentity,
        precision: Precision,
    ) -> None:
        self._spec = spec
        self._runtime, self._engine = runtime, engine
        self._pool: ExecutionPool | None = pool
        self.identity = identity
        self.precision = precision
        self.cache_report: CacheReport | None = None
        self._input_dtype = np.dtype(spec.input_dtype)
        self._healthy_at_close = True

    @classmethod
    def from_serialized(
        cls,
        spec: EngineSpec,
        engine_bytes: bytes,
        *,
        precision: Precision | None = None,
        device: int = 0,
        use_graphs: bool = True,
    ) -> TensorRTEngine:
        """Deserialize a plan on GPU ``device`` and create ``spec.workers`` execution slots.

        Raises:
            IncompatibleEngineError: TensorRT refused the plan (other TensorRT version or GPU,
                or corrupt bytes); the cache discards the entry and rebuilds.
        """
        trt, cudart = _import_trt(), _import_cudart()
        cuda_call(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        init_plugins(trt)  # plans that use plugins need their creators registered
        identity = device_identity(device)
        runtime = trt.Runtime(trt_logger(trt))
        if spec.compatibility.version_compatible:
            # A version-compatible plan carries the lean runtime that must run it.
            runtime.engine_host_code_allowed = True
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise IncompatibleEngineError(
                f"TensorRT {identity.tensorrt_version} on {identity.gpu_name} ({identity.sm}) cannot "
                f"deserialize the {len(engine_bytes)}-byte plan for {spec.model}/{spec.version}"
            )
        pool = ExecutionPool(trt, cudart, engine, spec, device=device, use_graphs=use_graphs)
        return cls(spec, runtime, engine, pool, identity, precision or spec.precision)

    @classmethod
    def load(
        cls,
        spec: EngineSpec,
        cache: EngineCache | None = None,
        *,
        device: int = 0,
        calibration_batches: Iterable[np.ndarray] | None = None,
        calibration_digest: str | None = None,
        calibration_cache_path: Path | None = None,
        timing_cache_dir: Path | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        validate: Callable[[TensorRTEngine], Mapping[str, object] | None] | None = None,
    ) -> TensorRTEngine:
        """Load the plan for ``spec`` on GPU ``device`` through ``cache``, building it there
        on a miss.

        Args:
            cache: The engine cache; None builds every time (logged: slow start-up).
            calibration_digest: Identifies the INT8 calibration set in the cache key.
            timing_cache_dir: Where per-(model, GPU, TensorRT) timing caches live.
            validate: Runs on a freshly built engine before it is published (the accuracy
                guard); raising refuses the engine.

        The returned engine's :attr:`cache_report` says where it came from and the
        build/load seconds.
        """
        # Fail fast, with the install hint, before reading or hashing anything.
        _import_trt()
        _import_cudart()
        identity = device_identity(device)
        model = inspect_model(Path(spec.onnx_path))
        timing = timing_cache_file(timing_cache_dir, spec, identity) if timing_cache_dir else None

        def build() -> bytes:
            return build_serialized_engine(
                spec,
                precision=spec.precision,
                calibration_batches=calibration_batches,
                calibration_cache_path=calibration_cache_path,
                timing_cache_path=timing,
                workspace_bytes=workspace_bytes,
                device=device,
                model=model,
            )

        def load(data: bytes) -> TensorRTEngine:
            return cls.from_serialized(spec, data, device=device)

        if cache is None:
            logger.warning(
                "no engine cache for %s/%s: building a TensorRT engine in-process",
                spec.model,
                spec.version,
            )
            return load(build())
        calibrated = spec.precision is Precision.INT8 and not model.quantized
        options = {"calibration": calibration_digest} if calibrated and calibration_digest else {}
        key = engine_cache_key(spec, model.digest, identity, options=options)
        info = {
            "model": spec.model,
            "version": spec.version,
            "gpu": identity.gpu_name,
            "device": device,
            "cuda_driver": identity.cuda_driver_version,
            "quantization": "explicit"
            if model.quantized
            else "calibrated"
            if calibrated
            else "none",
        }
        result = cache.get_or_build(key, build=build, load=load, validate=validate, info=info)
        result.value.cache_report = result.report
        return result.value

    @property
    def backend_name(self) -> str:
        return f"tensorrt:{self.precision.value}:{self.identity.sm}"

    @property
    def healthy(self) -> bool:
        """False once a sticky CUDA fault broke the engine (the replica must be replaced)."""
        return self._pool.healthy if self._pool is not None else self._healthy_at_close

    def check(self) -> bool:
        """Health check for the model server: same as :attr:`healthy`."""
        return self.healthy

    @property
    def graph_runs(self) -> int:
        """Batches served by replaying a CUDA graph."""
        return self._pool.graph_runs if self._pool is not None else 0

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run ``batch`` (N rows): padded up to the next built batch size, padding cut off after.

        Padding to the built sizes rather than running any size inside the profile keeps
        the set of shapes small and equal to the ones that were tuned, warmed up and
        captured into CUDA graphs.

        Raises:
            TensorRTDeviceFault: a sticky CUDA fault, now or earlier (the engine is broken).
            TensorRTError: the engine is closed, or a CUDA/TensorRT call failed.
        """
        self._check_batch(batch.shape, batch.dtype)

        def part(start: int, rows: int, size: int) -> dict[str, np.ndarray]:
            chunk = batch[start : start + rows]
            if size > rows:  # repeat the last row: stays in-distribution, unlike zeros
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - rows, axis=0)])
            return self._running_pool().run(chunk)

        return self._in_parts(len(batch), part)

    def infer_bound(self, batch: Any) -> Mapping[str, np.ndarray]:
        """Run one batch that may already be on the GPU.

        A CUDA array (``__cuda_array_interface__``, C-contiguous, on this engine's GPU, its
        producing stream synchronized, as a :class:`serve.imaging.device_batch.DeviceBatch`
        tensor is) is copied device to device into the engine's bound input, padding
        included: it never crosses to the host, and only the outputs are copied back, once.
        A NumPy array runs as :meth:`infer`.

        Raises:
            ValueError: ``batch`` is not contiguous, or not of the engine's input shape or dtype.
            TensorRTDeviceFault / TensorRTError: as :meth:`infer`.
        """
        buffer = buffer_of(batch)
        if buffer.device == "cpu":
            return self.infer(batch)
        self._check_batch(buffer.shape, buffer.dtype)
        row_bytes = buffer.row_bytes

        def part(start: int, rows: int, size: int) -> dict[str, np.ndarray]:
            pointer = buffer.pointer + start * row_bytes
            return self._running_pool().run_device(pointer, rows, size, row_bytes)

        return self._in_parts(buffer.shape[0], part)

    def _check_batch(self, shape: tuple[int, ...], dtype: np.dtype) -> None:
        spec = self._spec
        if len(shape) != len(spec.input_shape) + 1 or tuple(shape[1:]) != spec.input_shape:
            raise ValueError(f"batch shape {shape} does not match (N, *{spec.input_shape})")
        if dtype != self._input_dtype:
            raise ValueError(f"batch dtype {dtype} does not match engine input {self._input_dtype}")
        if shape[0] == 0:
            raise ValueError("empty batch")

    def _in_parts(
        self, n: int, run: Callable[[int, int, int], dict[str, np.ndarray]]
    ) -> dict[str, np.ndarray]:
        """``run(start, rows, size)`` over parts of at most the largest built batch size, each
        run at the smallest built size that holds it; the outputs joined, padding cut off."""
        spec = self._spec
        parts = []
        for start in range(0, n, spec.max_batch_size):
            rows = min(spec.max_batch_size, n - start)
            size = next(s for s in spec.batch_sizes if s >= rows)
            outputs = run(start, rows, size)
            names = spec.output_names or tuple(outputs)
            parts.append({name: outputs[name][:rows] for name in names})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _running_pool(self) -> ExecutionPool:
        if self._pool is None:
            raise TensorRTError(f"engine for {self._spec.model}/{self._spec.version} is closed")
        return self._pool

    def close(self) -> None:
        """Free contexts, streams and buffers, then the engine and runtime (in that order)."""
        if self._pool is not None:
            self._healthy_at_close = self._pool.healthy
            self._pool.close()
        self._pool = None
        self._engine = None
        self._runtime = None
