"""TensorRT backend (TensorRT >= 10, cuda-python), the only module importing ``tensorrt``/``cuda``.

Both are imported when an engine is built or loaded, never at import of this
module, so CPU-only machines import the package fine and fail only if they ask
for TensorRT, with :class:`TensorRTUnavailableError` and the install hint.

Loading goes through the engine cache (:mod:`serve.engines.cache`): a plan is
built once per (ONNX, TensorRT version, GPU, precision, batch profile) and then
deserialized from memory, local disk or ``gs://`` by every other replica.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from serve.engines._tensorrt_build import build_plan
from serve.engines._tensorrt_common import (
    INSTALL_HINT,
    TensorRTError,
    TensorRTUnavailableError,
    cuda_call,
    trt_logger,
    version_string,
)
from serve.engines._tensorrt_runtime import ExecutionPool
from serve.engines.base import EngineSpec
from serve.engines.cache import CacheReport, EngineCache, EngineCacheKey, IncompatibleEngineError
from serve.model_config import Precision

logger = logging.getLogger(__name__)

DEFAULT_WORKSPACE_BYTES = 2 * 1024**3

__all__ = [
    "DEFAULT_WORKSPACE_BYTES",
    "DeviceIdentity",
    "TensorRTEngine",
    "TensorRTError",
    "TensorRTUnavailableError",
    "build_serialized_engine",
    "device_identity",
    "engine_cache_key",
]


def _import_trt() -> ModuleType:
    try:
        import tensorrt as trt
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"TensorRT is not installed ({err}); {INSTALL_HINT}"
        ) from err
    major = str(getattr(trt, "__version__", "0")).split(".")[0]
    if not major.isdigit() or int(major) < 10:
        raise TensorRTUnavailableError(
            f"TensorRT {getattr(trt, '__version__', '?')} is too old (need >= 10); {INSTALL_HINT}"
        )
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


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What a TensorRT plan is specific to; part of every engine cache key."""

    gpu_name: str
    compute_capability: tuple[int, int]
    tensorrt_version: str
    cuda_runtime_version: str
    cuda_driver_version: str
    device_index: int = 0

    @property
    def sm(self) -> str:
        """``sm_90`` style compute capability."""
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


def device_identity(device: int = 0) -> DeviceIdentity:
    """GPU name and compute capability, TensorRT and CUDA versions of ``device``.

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
    runtime = cuda_call(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    return DeviceIdentity(
        gpu_name=name.rstrip("\x00").strip(),
        compute_capability=(int(props.major), int(props.minor)),
        tensorrt_version=str(trt.__version__),
        cuda_runtime_version=version_string(runtime),
        cuda_driver_version=version_string(driver),
        device_index=device,
    )


def engine_cache_key(
    spec: EngineSpec,
    onnx_bytes: bytes,
    identity: DeviceIdentity,
    *,
    precision: Precision | None = None,
    options: Mapping[str, str] | None = None,
) -> EngineCacheKey:
    """The cache key of a TensorRT plan for ``spec`` on ``identity``.

    The driver version is left out on purpose: plans survive driver upgrades, and keying
    on it would make every node upgrade rebuild every engine. It is recorded in metadata.
    """
    return EngineCacheKey(
        onnx_sha256=hashlib.sha256(onnx_bytes).hexdigest(),
        backend="tensorrt",
        backend_version=identity.tensorrt_version,
        device_name=identity.gpu_name,
        compute_capability=identity.sm,
        cuda_version=identity.cuda_runtime_version,
        precision=(precision or spec.precision).value,
        batch_sizes=tuple(spec.batch_sizes),
        input_name=spec.input_name,
        input_shape=tuple(spec.input_shape),
        input_dtype=spec.input_dtype,
        options=tuple(sorted((options or {}).items())),
    )


def build_serialized_engine(
    spec: EngineSpec,
    onnx_bytes: bytes,
    *,
    precision: Precision,
    calibration_batches: Iterable[np.ndarray] | None = None,
    calibration_cache_path: Path | None = None,
    timing_cache_path: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> bytes:
    """Build a TensorRT plan from ONNX bytes.

    Args:
        spec: Model, input name/shape/dtype and batch sizes (the profile is
            ``min = batch_sizes[0]``, ``opt = max = batch_sizes[-1]``).
        precision: ``fp16``/``int8`` need a GPU with fast FP16/INT8 (else ``ConfigError``).
        calibration_batches: Preprocessed input batches for INT8 calibration.
        calibration_cache_path: Read instead of calibrating when present; written after.
        timing_cache_path: Per-device timing cache, loaded when it fits and saved after.
        workspace_bytes: Builder workspace memory pool limit.

    Raises:
        TensorRTUnavailableError: TensorRT or cuda-python missing.
        EngineBuildError: the parser or the builder failed (their errors are logged).
        ConfigError: the model does not fit the spec, or the precision cannot be honoured.
    """
    trt, cudart = _import_trt(), _import_cudart()
    return build_plan(
        trt,
        cudart,
        spec,
        onnx_bytes,
        precision=precision,
        calibration_batches=calibration_batches,
        calibration_cache_path=calibration_cache_path,
        timing_cache_path=timing_cache_path,
        workspace_bytes=workspace_bytes,
    )


class TensorRTEngine:
    """A deserialized TensorRT engine behind the :class:`~serve.engines.base.Engine` protocol."""

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

    @classmethod
    def from_serialized(
        cls,
        spec: EngineSpec,
        engine_bytes: bytes,
        *,
        precision: Precision | None = None,
        device: int = 0,
    ) -> TensorRTEngine:
        """Deserialize a plan and create ``spec.workers`` execution slots.

        Raises:
            IncompatibleEngineError: TensorRT refused the plan (other TensorRT version or GPU,
                or corrupt bytes); the cache discards the entry and rebuilds.
        """
        trt, cudart = _import_trt(), _import_cudart()
        cuda_call(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
        identity = device_identity(device)
        runtime = trt.Runtime(trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(engine_bytes)
        if engine is None:
            raise IncompatibleEngineError(
                f"TensorRT {identity.tensorrt_version} on {identity.gpu_name} ({identity.sm}) cannot "
                f"deserialize the {len(engine_bytes)}-byte plan for {spec.model}/{spec.version}"
            )
        pool = ExecutionPool(trt, cudart, engine, spec, device=device)
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
        timing_cache_path: Path | None = None,
        workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
        validate: Callable[[TensorRTEngine], Mapping[str, object] | None] | None = None,
    ) -> TensorRTEngine:
        """Load the plan for ``spec`` through ``cache``, building it on a miss.

        Args:
            cache: The engine cache; None builds every time (logged: slow start-up).
            calibration_digest: Identifies the INT8 calibration set in the cache key.
            validate: Runs on a freshly built engine before it is published (the accuracy
                guard); raising refuses the engine.

        The returned engine's :attr:`cache_report` says where it came from and the
        build/load seconds.
        """
        # Fail fast, with the install hint, before reading or hashing anything.
        _import_trt()
        _import_cudart()
        identity = device_identity(device)
        onnx_bytes = Path(spec.onnx_path).read_bytes()

        def build() -> bytes:
            return build_serialized_engine(
                spec,
                onnx_bytes,
                precision=spec.precision,
                calibration_batches=calibration_batches,
                calibration_cache_path=calibration_cache_path,
                timing_cache_path=timing_cache_path,
                workspace_bytes=workspace_bytes,
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
        options = (
            {"calibration": calibration_digest}
            if spec.precision is Precision.INT8 and calibration_digest
            else {}
        )
        key = engine_cache_key(spec, onnx_bytes, identity, options=options)
        info = {
            "model": spec.model,
            "version": spec.version,
            "gpu": identity.gpu_name,
            "cuda_driver": identity.cuda_driver_version,
        }
        result = cache.get_or_build(key, build=build, load=load, validate=validate, info=info)
        result.value.cache_report = result.report
        return result.value

    @property
    def backend_name(self) -> str:
        return f"tensorrt:{self.precision.value}:{self.identity.sm}"

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run ``batch`` (N rows): padded up to the next built batch size, padding cut off after.

        Padding to the built sizes rather than running any size inside the profile keeps
        the set of shapes small and equal to the ones that were tuned and warmed up.
        """
        spec = self._spec
        if batch.ndim != len(spec.input_shape) + 1 or tuple(batch.shape[1:]) != spec.input_shape:
            raise ValueError(f"batch shape {batch.shape} does not match (N, *{spec.input_shape})")
        if batch.dtype != self._input_dtype:
            raise ValueError(
                f"batch dtype {batch.dtype} does not match engine input {self._input_dtype}"
            )
        n = len(batch)
        if n == 0:
            raise ValueError("empty batch")
        if n > spec.max_batch_size:
            parts = [
                self.infer(batch[i : i + spec.max_batch_size])
                for i in range(0, n, spec.max_batch_size)
            ]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        size = next(s for s in spec.batch_sizes if s >= n)
        if size > n:  # repeat the last row: stays in-distribution, unlike zeros
            batch = np.concatenate([batch, np.repeat(batch[-1:], size - n, axis=0)])
        if self._pool is None:
            raise TensorRTError(f"engine for {spec.model}/{spec.version} is closed")
        outputs = self._pool.run(batch)
        names = spec.output_names or tuple(outputs)
        return {name: outputs[name][:n] for name in names}

    def close(self) -> None:
        """Free contexts, streams and device buffers, then the engine and runtime (in that order)."""
        if self._pool is not None:
            self._pool.close()
        self._pool = None
        self._engine = None
        self._runtime = None
