"""Building a serialized TensorRT engine from ONNX, on TensorRT 10.x and 11.x.

The ``trt`` and ``cudart`` modules are passed in by :mod:`serve.engines.tensorrt`.

Precision, by TensorRT version and model:

| model \\ TensorRT           | 10.x                                    | 11.x                         |
| --------------------------- | --------------------------------------- | ---------------------------- |
| FP32 ONNX, ``fp32``         | weakly typed network                    | strongly typed (always)      |
| FP32 ONNX, ``fp16``         | ``BuilderFlag.FP16``                    | refused: export an FP16 ONNX |
| FP32 ONNX, ``int8``         | calibrator (deprecated since 10.1)      | refused: export a Q/DQ ONNX  |
| FP16 ONNX, ``fp16``         | strongly typed                          | strongly typed               |
| Q/DQ ONNX, ``int8``         | strongly typed (explicit quantization)  | strongly typed               |

Refusals raise :class:`UnsupportedPrecisionError`, which the loader treats like
any other unavailable backend: it falls back to the next one.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from serve.engines._cache_stores import write_atomic
from serve.engines._onnx_info import OnnxInfo
from serve.engines._tensorrt_calibration import make_calibrator, rebatch
from serve.engines._tensorrt_common import (
    UnsupportedPrecisionError,
    cuda_call,
    init_plugins,
    tensorrt_major,
    trt_logger,
)
from serve.engines.base import EngineSpec, HardwareCompatibility
from serve.engines.cache import EngineBuildError
from serve.model_config import Precision
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.tensorrt")


def build_plan(
    trt: ModuleType,
    cudart: ModuleType,
    spec: EngineSpec,
    model: OnnxInfo,
    *,
    precision: Precision,
    calibration_batches: Iterable[np.ndarray] | None,
    calibration_cache_path: Path | None,
    timing_cache_path: Path | None,
    workspace_bytes: int,
    device: int,
    onnx_bytes: bytes | None = None,
) -> bytes:
    """Parse the model of ``spec`` and build a plan at ``precision`` on GPU ``device``; see
    :func:`serve.engines.tensorrt.build_serialized_engine`."""
    # TensorRT builds for the calling thread's current device; the cache key names
    # ``device``, so the build must happen there and nowhere else.
    cuda_call(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")
    init_plugins(trt)
    strongly_typed = _strongly_typed(trt, spec, model, precision)
    log = trt_logger(trt)
    builder = trt.Builder(log)
    flags = 0
    if strongly_typed and tensorrt_major(trt) < 11:  # 11: always strongly typed
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    _parse(trt, network, log, spec, onnx_bytes)
    row_shape = _check_network(network, spec)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    _set_compatibility(trt, cudart, config, spec, device)
    profile = builder.create_optimization_profile()
    sizes = spec.batch_sizes
    # OPT = the largest size: under load the dynamic batcher fills batches, and that is
    # where kernel choice pays; small batches are cheap whichever kernels run them.
    profile.set_shape(
        spec.input_name, (sizes[0], *row_shape), (sizes[-1], *row_shape), (sizes[-1], *row_shape)
    )
    if config.add_optimization_profile(profile) < 0:
        raise EngineBuildError(f"invalid optimization profile for batch sizes {sizes}")
    calibrator = None
    if not strongly_typed:
        calibrator = _set_weak_precision(
            trt, cudart, builder, config, spec, row_shape, precision,
            calibration_batches, calibration_cache_path,
        )  # fmt: skip
    cache = _attach_timing_cache(config, timing_cache_path) if timing_cache_path else None
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
    if cache is not None and timing_cache_path is not None:
        save_timing_cache(config, timing_cache_path)
    return bytes(plan)


def _parse(trt: ModuleType, network: Any, log: Any, spec: EngineSpec, data: bytes | None) -> None:
    parser = trt.OnnxParser(network, log)
    path = str(spec.onnx_path)
    # From the file, or with its path: external weights are found relative to the model.
    ok = parser.parse_from_file(path) if data is None else parser.parse(data, path=path)
    if not ok:
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"TensorRT cannot parse {spec.model}/{spec.version} ONNX: {errors}")


def _strongly_typed(
    trt: ModuleType, spec: EngineSpec, model: OnnxInfo, precision: Precision
) -> bool:
    """Whether the network is built strongly typed; refuses what this TensorRT cannot do."""
    where = f"{spec.model}/{spec.version}"
    if model.precision != "fp32" or tensorrt_major(trt) >= 11:
        # Strongly typed: every tensor keeps the type the model gives it.
        if precision.value != model.precision:
            hint = {
                "int8": "export an explicitly quantized (Q/DQ) ONNX model",
                "fp16": "export an FP16 ONNX model",
                "fp32": "use the FP32 export of the model",
            }[precision.value]
            raise UnsupportedPrecisionError(
                f"TensorRT {trt.__version__} builds {where} as the ONNX model is typed "
                f"({model.precision}), not at the configured {precision.value}: {hint}"
                + (", or TensorRT 10.x" if model.precision == "fp32" else "")
            )
        return True
    return False


def _set_compatibility(
    trt: ModuleType, cudart: ModuleType, config: Any, spec: EngineSpec, device: int
) -> None:
    compat = spec.compatibility
    if compat.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if compat.hardware is HardwareCompatibility.NONE:
        return
    if compat.hardware is HardwareCompatibility.AMPERE_PLUS:
        props = cuda_call(
            cudart, cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})"
        )
        if (int(props.major), int(props.minor)) < (8, 0):
            raise ConfigError(
                f"hardware compatibility ampere_plus for {spec.model}/{spec.version} needs an "
                f"Ampere or later GPU to build on; device {device} is sm_{props.major}{props.minor}"
            )
    level = trt.HardwareCompatibilityLevel
    config.hardware_compatibility_level = (
        level.AMPERE_PLUS
        if compat.hardware is HardwareCompatibility.AMPERE_PLUS
        else level.SAME_COMPUTE_CAPABILITY
    )


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


def _set_weak_precision(
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
    """TensorRT 10.x, FP32 model: precision by builder flags (and a calibrator for INT8)."""
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
            f"precision int8 for {where} needs calibration batches (the version's calibration/ "
            f"images) or an existing calibration cache (looked for {cache_path})"
        )
    logger.info(
        "calibrating %s for INT8 with TensorRT %s's implicit quantization (deprecated; a Q/DQ "
        "ONNX model builds on TensorRT 11 too)", where, trt.__version__,
    )  # fmt: skip
    config.set_flag(trt.BuilderFlag.INT8)
    if fast_fp16:  # layers without INT8 kernels fall back to FP16, not FP32
        config.set_flag(trt.BuilderFlag.FP16)
    it: Iterator[np.ndarray] = iter(batches or ())
    first = next(it, None)
    calib_batch = len(first) if first is not None else spec.batch_sizes[-1]
    calibrator = make_calibrator(
        trt,
        cudart,
        rebatch(first, it, calib_batch),
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


# --- timing cache --------------------------------------------------------------------------------


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock beside ``path``, shared by every process on the node."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _attach_timing_cache(config: Any, path: Path) -> Any:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # The file names model, GPU and TensorRT; a mismatch means it is corrupt or was
        # copied from elsewhere: useless here, and replaced when this build saves.
        logger.warning("timing cache %s does not fit this device; starting a new one", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def save_timing_cache(config: Any, path: Path) -> None:
    """Merge this build's timings into ``path``: under a file lock, the file is re-read and
    combined (another builder may have saved since this one loaded it), then replaced
    atomically, so concurrent builders neither lose each other's timings nor tear the file."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    with _file_lock(path):
        if path.is_file():
            theirs = config.create_timing_cache(path.read_bytes())
            if theirs is not None and not cache.combine(theirs, ignore_mismatch=False):
                logger.warning("timing cache %s no longer fits this device; replacing it", path)
        write_atomic(path, bytes(cache.serialize()))
