"""Turning a repository entry into a warmed-up :class:`~serve.model.batch.LoadedVersion`."""

from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from serve.engines.accuracy_guard import AccuracyGuardError
from serve.engines.base import (
    Engine,
    EngineCompatibility,
    EngineSpec,
    HardwareCompatibility,
    warm_up_batch_sizes,
)
from serve.engines.build import load_cached_engine
from serve.engines.cache import EngineCache
from serve.engines.errors import load_error_is_permanent
from serve.imaging.cpu_decode import to_model_input
from serve.model.batch import LoadedVersion
from serve.model.repository import ModelVersion
from serve.model.validation import calibration_set, validation_set
from serve.model_config import Backend
from serve.postprocess.factory import make_postprocessor
from shared.errors import ConfigError, TransientError

logger = logging.getLogger(__name__)

BACKENDS_ENV = "TRIGGERFISH_BACKENDS"


@dataclass(frozen=True, slots=True)
class OpenedEngine:
    """An engine and where it came from.

    Attributes:
        engine: The loaded engine.
        source: The engine cache's report level: ``memory``, ``disk``, ``gcs``, ``shared``
            (found in the cache at those levels) or ``built`` (built here).
        fallback_reason: Why the preferred backend(s) were refused (an accuracy-guard
            verdict's reason, a missing backend); None when the first backend loaded.
    """

    engine: Engine
    source: str
    fallback_reason: str | None = None


def backend_preference(allowed: tuple[Backend, ...], env: str | None = None) -> list[Backend]:
    """Backends to try, in order: the config's order, narrowed by ``TRIGGERFISH_BACKENDS``."""
    raw = os.environ.get(BACKENDS_ENV, "") if env is None else env
    if not raw.strip():
        return list(allowed)
    try:
        wanted = [Backend(b.strip()) for b in raw.split(",") if b.strip()]
    except ValueError as err:
        raise ConfigError(
            f"{BACKENDS_ENV} must list backends from {[b.value for b in Backend]}, got {raw!r}"
        ) from err
    chosen = [b for b in allowed if b in wanted]  # the config's order, as documented
    if not chosen:
        raise ConfigError(f"{BACKENDS_ENV}={raw!r} allows none of the model's backends {allowed}")
    return chosen


def engine_spec(mv: ModelVersion, output_names: tuple[str, ...], workers: int = 1) -> EngineSpec:
    """The cheap description of what to load for ``mv``."""
    cfg = mv.config
    shape = (
        (cfg.input.channels, cfg.input.height, cfg.input.width)
        if cfg.input.layout == "NCHW"
        else (cfg.input.height, cfg.input.width, cfg.input.channels)
    )
    return EngineSpec(
        model=mv.name,
        version=mv.version,
        onnx_path=mv.onnx_path,
        input_name=cfg.input.name,
        input_shape=shape,
        input_dtype=cfg.input.dtype,
        output_names=output_names,
        precision=cfg.precision,
        batch_sizes=cfg.batching.engine_batch_sizes,
        workers=workers,
        compatibility=EngineCompatibility(
            version_compatible=cfg.tensorrt.version_compatible,
            hardware=HardwareCompatibility(cfg.tensorrt.hardware_compatibility),
        ),
    )


def open_engine(
    mv: ModelVersion,
    spec: EngineSpec,
    cache: EngineCache,
    backends: list[Backend],
    work_dir: Path,
    gpu_mem_limit: int | None = None,
) -> OpenedEngine:
    """Load through the engine cache on the first backend that works (ONNX Runtime's CUDA
    arena capped at ``gpu_mem_limit`` bytes, :func:`serve.gpus.onnxruntime_arena_limit`).

    A fallback (TensorRT missing, or refused by the accuracy guard) is logged,
    visible in every result's ``backend``, and its cause kept in ``fallback_reason``. Only a permanent refusal falls back: a
    transient failure (out of memory while building, an I/O error) is raised as it
    is, so that a retry gets the preferred backend rather than a slower one for good.

    Raises:
        ConfigError: every backend refused the version for good.
        TransientError: a backend failed for a reason that may pass.
    """
    failures = []
    for backend in backends:
        try:
            reduced = backend is Backend.TENSORRT and spec.precision.value != "fp32"
            result = load_cached_engine(
                spec,
                backend,
                cache,
                calibration=calibration_set(mv, work_dir) if spec.precision.value == "int8" else None,
                validation=validation_set(mv) if reduced else None,
                # One file: the backend detects and replaces a cache from another GPU/TensorRT.
                timing_cache_path=work_dir / "timing" / "tensorrt.timing-cache",
                gpu_mem_limit=gpu_mem_limit,
            )
        except Exception as err:  # noqa: BLE001 - classified: permanent falls back, transient is raised
            if not load_error_is_permanent(err):
                if isinstance(err, TransientError):
                    raise
                raise TransientError(
                    f"backend {backend.value} failed to load {spec.model}/{spec.version}: {err!r}"
                ) from err
            logger.warning("backend %s unavailable for %s/%s: %s", backend.value, spec.model, spec.version, err)
            verdict = err.verdict if isinstance(err, AccuracyGuardError) else None
            if verdict is not None and verdict.reason:
                failures.append(f"{backend.value}: accuracy guard: {verdict.reason}")
            else:
                failures.append(f"{backend.value}: {err}")
            continue
        report = result.report
        logger.info(
            "engine for %s/%s from %s (lookup %.3fs, build %.3fs, load %.3fs)",
            spec.model, spec.version, report.level, report.lookup_seconds,
            report.build_seconds or 0.0, report.load_seconds,
        )  # fmt: skip
        return OpenedEngine(result.value, report.level, "; ".join(failures) or None)
    raise ConfigError(f"no backend could load {spec.model}/{spec.version}: {'; '.join(failures)}")


def load_version(
    mv: ModelVersion,
    cache: EngineCache,
    work_dir: Path,
    workers: int = 1,
    *,
    warm: bool = True,
    decode: str = "cpu",
    max_pixels: int = 60_000_000,
    gpu_mem_limit: int | None = None,
) -> LoadedVersion:
    """Load the engine for ``mv`` and run a warm-up batch at every built batch size.

    ``warm=False`` leaves the warm-up to the caller (:func:`warm_up`), which may run
    it on another thread than the load. ``decode`` (``auto``/``device``/``cpu``, the
    ``TRIGGERFISH_DECODE`` setting) decides whether the version decodes batches of bytes
    on the GPU (:func:`serve.model.device_decode.attach_device_decode`).
    """
    postprocess = make_postprocessor(mv.config.postprocess)
    spec = engine_spec(mv, postprocess.output_names, workers)
    started = time.monotonic()
    opened = open_engine(
        mv, spec, cache, backend_preference(mv.config.backends), work_dir, gpu_mem_limit
    )
    engine = opened.engine
    loaded = LoadedVersion(
        mv.name, mv.version, mv.config, engine, postprocess, mv.labels,
        engine_source=opened.source, fallback_reason=opened.fallback_reason,
    )  # fmt: skip
    if decode != "cpu":
        # Imported here: the device modules are looked for only when asked to.
        from serve.model.device_decode import attach_device_decode

        try:
            attach_device_decode(loaded, decode, max_pixels)
        except BaseException:
            engine.close()
            raise
    if warm:
        try:
            warm_up(loaded)
        except BaseException:
            engine.close()  # a version that cannot warm up is not kept: release its memory now
            raise
    logger.info(
        "loaded %s/%s on %s (engine from %s, decode %s) in %.2fs", mv.name, mv.version, engine.backend_name,
        opened.source, loaded.decode, time.monotonic() - started,
    )  # fmt: skip
    return loaded


def warm_up(loaded: LoadedVersion, pause: float = 0.0) -> None:
    """Run each engine batch size once (or the ones the engine says are enough,
    :func:`~serve.engines.base.warm_up_batch_sizes`) so the first real request pays no lazy init.

    Also records the engine's output dtypes and shapes (``loaded.output_specs``).
    ``pause`` > 0 sleeps that many times each batch's duration after it: a version
    warmed up next to one that is serving leaves the cores to the served batches
    for part of the time instead of taking them all in one burst.
    """
    cfg = loaded.config
    for size in warm_up_batch_sizes(loaded.engine, cfg.batching.engine_batch_sizes):
        pixels = np.zeros((size, cfg.input.height, cfg.input.width, cfg.input.channels), np.uint8)
        started = time.monotonic()
        outputs = loaded.engine.infer(to_model_input(pixels, cfg.input, cfg.preprocess))
        if pause > 0:
            time.sleep(pause * (time.monotonic() - started))
        missing = [n for n in loaded.postprocess.output_names if n not in outputs]
        if missing:
            raise ConfigError(f"{loaded.model}/{loaded.version} warm-up produced no outputs {missing}")
        loaded.output_specs = {
            name: (str(np.asarray(value).dtype), tuple(np.asarray(value).shape[1:])) for name, value in outputs.items()
        }
    if loaded.preparer is not None:
        _warm_device_decode(loaded)


def _warm_device_decode(loaded: LoadedVersion) -> None:
    """One blank JPEG through the device pipeline: the decoder's and the array module's
    first-use work (kernel compilation, buffers) is paid here, not by the first batch."""
    from serve.imaging.device_infer import infer_encoded

    cfg = loaded.config.input
    buf = io.BytesIO()
    Image.new("RGB", (cfg.width, cfg.height)).save(buf, "JPEG")
    [result] = infer_encoded(loaded, loaded.preparer, [buf.getvalue()])
    if isinstance(result, Exception):
        raise result
