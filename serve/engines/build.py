"""Building and loading engines through the cache, with the accuracy guard in the path.

:func:`load_cached_engine` is what a model replica calls; :func:`build_engine` is
behind ``triggerfish build-engine MODEL[:VERSION] --precision fp16`` and reports
where the engine came from and what building and loading cost.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from serve.engines._onnxruntime_cache import load_onnxruntime_cached, session_engine
from serve.engines.accuracy_guard import AccuracyGuard, AccuracyGuardError, ImagePostprocess
from serve.engines.base import Engine, EngineSpec
from serve.engines.cache import CacheResult, EngineCache
from serve.model_config import Backend, Precision

logger = logging.getLogger(__name__)

__all__ = [
    "BuildReport",
    "CalibrationSet",
    "ValidationSet",
    "build_engine",
    "load_cached_engine",
]


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    """Preprocessed batches for INT8 calibration, and where to keep the calibration cache."""

    batches: Sequence[np.ndarray]
    cache_path: Path | None = None

    def digest(self) -> str:
        """Identifies the data in the engine cache key (other data, other INT8 scales)."""
        h = hashlib.sha256()
        for batch in self.batches:
            arr = np.ascontiguousarray(batch)
            h.update(f"{arr.dtype.str}{arr.shape}".encode())
            h.update(arr.tobytes())
        return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ValidationSet:
    """Preprocessed batches and the per-image postprocess the accuracy guard compares with,
    and the guard's thresholds for this model (``None``: the defaults)."""

    batches: Sequence[np.ndarray]
    postprocess: ImagePostprocess
    guard: AccuracyGuard | None = None


@dataclass(frozen=True, slots=True)
class BuildReport:
    """What ``build-engine`` prints.

    Attributes:
        cache_level: ``memory`` | ``disk`` | ``gcs`` | ``shared`` | ``built``.
        accuracy: The accuracy guard verdict (fresh, or recorded when the entry was built).
    """

    model: str
    version: str
    backend: str
    precision: str
    backend_name: str
    cache_level: str
    key_digest: str
    engine_bytes: int
    lookup_seconds: float
    build_seconds: float
    load_seconds: float
    discarded: tuple[str, ...] = ()
    accuracy: Mapping[str, object] | None = None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _reference_engine(spec: EngineSpec) -> Engine:
    """FP32 ONNX Runtime on CPU: the yardstick reduced precision is measured against."""
    # From the path, so that external weights beside the model load too.
    return session_engine(
        replace(spec, precision=Precision.FP32), str(spec.onnx_path), ["CPUExecutionProvider"]
    )


def _guard_validator(
    spec: EngineSpec,
    validation: ValidationSet | None,
    guard: AccuracyGuard,
    allow_unvalidated: bool,
) -> Callable[[Engine], Mapping[str, object] | None] | None:
    if spec.precision is Precision.FP32:
        return None
    if validation is None:
        if allow_unvalidated:
            logger.warning(
                "accuracy guard skipped for %s/%s at %s: no validation set (allowed explicitly)",
                spec.model,
                spec.version,
                spec.precision.value,
            )
            return None
        message = (
            f"accuracy guard refuses {spec.model}/{spec.version} at {spec.precision.value}: no "
            "validation set was given (pass one, or allow_unvalidated=True)"
        )
        logger.error(message)
        raise AccuracyGuardError(message)

    def validate(engine: Engine) -> Mapping[str, object]:
        reference = _reference_engine(spec)
        try:
            verdict = guard.check(
                engine,
                reference,
                validation.batches,
                validation.postprocess,
                model=spec.model,
                version=spec.version,
                precision=spec.precision.value,
            )
        finally:
            reference.close()
        return verdict.to_dict()

    return validate


def load_cached_engine(
    spec: EngineSpec,
    backend: Backend,
    cache: EngineCache,
    *,
    calibration: CalibrationSet | None = None,
    validation: ValidationSet | None = None,
    guard: AccuracyGuard | None = None,
    allow_unvalidated: bool = False,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    device: int = 0,
    gpu_mem_limit: int | None = None,
    timing_cache_dir: Path | None = None,
    timing_cache_path: Path | None = None,
) -> CacheResult[Engine]:
    """Load ``spec`` on ``backend`` through ``cache``; a fresh reduced-precision engine must
    pass the accuracy guard before it is published or returned.

    A cache hit was guarded when it was built (its verdict is in ``report.info``); a hit
    recorded without a verdict is checked now.

    ``gpu_mem_limit`` caps ONNX Runtime's CUDA arena (bytes); TensorRT's engines size their
    device memory when they are built.

    TensorRT keeps one timing cache per (model, GPU, TensorRT build) in
    ``timing_cache_dir``; ``timing_cache_path`` names a file in that directory instead
    (its folder is used), as callers written for a single shared file do.

    Raises:
        AccuracyGuardError: the engine disagrees with FP32, or no validation set was given.
        TensorRTUnavailableError / ConfigError / EngineBuildError: from the backend.
    """
    if backend is Backend.ONNXRUNTIME and spec.precision is not Precision.FP32:
        # ONNX Runtime runs the model's own arithmetic; the config's precision is a TensorRT knob.
        logger.info(
            "onnxruntime runs %s/%s at the ONNX model's precision, not %s",
            spec.model,
            spec.version,
            spec.precision.value,
        )
        spec = replace(spec, precision=Precision.FP32)
    # An explicit guard wins; else the model's own thresholds travel with its validation set.
    guard = guard or (validation.guard if validation else None) or AccuracyGuard()
    validate = _guard_validator(spec, validation, guard, allow_unvalidated)
    if backend is Backend.TENSORRT:
        from serve.engines.tensorrt import TensorRTEngine

        engine = TensorRTEngine.load(
            spec,
            cache,
            device=device,
            calibration_batches=calibration.batches if calibration else None,
            calibration_digest=calibration.digest() if calibration else None,
            calibration_cache_path=calibration.cache_path if calibration else None,
            timing_cache_dir=timing_cache_dir
            or (timing_cache_path.parent if timing_cache_path else None),
            validate=validate,
        )
        if engine.cache_report is None:  # TensorRTEngine.load sets it whenever a cache is given
            raise RuntimeError("TensorRTEngine.load returned no cache report")
        result: CacheResult[Engine] = CacheResult(engine, engine.cache_report)
    elif backend is Backend.ONNXRUNTIME:
        result = load_onnxruntime_cached(
            spec,
            cache,
            providers=providers,
            intra_op_threads=intra_op_threads,
            validate=validate,
            device=device,
            gpu_mem_limit=gpu_mem_limit,
        )
    else:
        raise ValueError(f"unknown backend {backend!r}")
    if (
        validate is not None
        and result.report.level != "built"
        and "validation" not in result.report.info
    ):
        try:
            verdict = validate(result.value)
        except AccuracyGuardError:
            result.value.close()
            raise
        result = CacheResult(
            result.value, replace(result.report, info={**result.report.info, "validation": verdict})
        )
    return result


def build_engine(
    spec: EngineSpec,
    backend: Backend,
    precision: Precision,
    cache: EngineCache,
    calibration: CalibrationSet | None = None,
    *,
    validation: ValidationSet | None = None,
    guard: AccuracyGuard | None = None,
    allow_unvalidated: bool = False,
    providers: Sequence[str] | None = None,
    timing_cache_dir: Path | None = None,
    timing_cache_path: Path | None = None,
    device: int = 0,
) -> BuildReport:
    """Make sure the engine for ``spec`` at ``precision`` is in ``cache`` and report on it.

    The engine is loaded once (that is how a built engine is proven usable, and how the
    load time is measured) and closed again.
    """
    spec = replace(spec, precision=precision)
    result = load_cached_engine(
        spec,
        backend,
        cache,
        calibration=calibration,
        validation=validation,
        guard=guard,
        allow_unvalidated=allow_unvalidated,
        providers=providers,
        timing_cache_dir=timing_cache_dir,
        timing_cache_path=timing_cache_path,
        device=device,
    )
    try:
        report = result.report
        accuracy = report.info.get("validation")
        return BuildReport(
            model=spec.model,
            version=spec.version,
            backend=backend.value,
            precision=spec.precision.value if backend is Backend.TENSORRT else Precision.FP32.value,
            backend_name=result.value.backend_name,
            cache_level=report.level,
            key_digest=report.key_digest,
            engine_bytes=report.engine_bytes,
            lookup_seconds=report.lookup_seconds,
            build_seconds=report.build_seconds,
            load_seconds=report.load_seconds,
            discarded=report.discarded,
            accuracy=dict(accuracy) if isinstance(accuracy, Mapping) else None,
        )
    finally:
        result.value.close()
