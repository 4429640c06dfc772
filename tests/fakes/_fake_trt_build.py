"""``Builder.build_serialized_network`` of the fake TensorRT: validation, calibration, packing."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from tests.fakes import fake_cudart
from tests.fakes import fake_tensorrt as trt


def build(
    builder: trt.Builder, network: trt.INetworkDefinition, config: trt.IBuilderConfig
) -> trt.IHostMemory | None:
    """Validate like TensorRT, run INT8 calibration, and return a packed fake engine."""
    logger = builder.logger
    if fake_cudart.current_device() != builder.device:
        raise trt.FakeMisuseError(
            f"builder made on device {builder.device} used from a thread on device "
            f"{fake_cudart.current_device()}"
        )
    if network.onnx is None or not network.num_inputs:
        trt._error(logger, "Network must have at least one input (was the ONNX model parsed?)")
        return None
    if config.has("FP16") and not builder.platform_has_fast_fp16:
        raise trt.FakeMisuseError("BuilderFlag.FP16 set on a platform without fast FP16")
    if config.has("INT8") and not builder.platform_has_fast_int8:
        raise trt.FakeMisuseError("BuilderFlag.INT8 set on a platform without fast INT8")
    if not _profiles_valid(logger, network, config):
        return None
    precision = _precision(logger, network, config)
    if precision is None:
        return None
    amax: dict[str, float] | None = None
    if precision == "int8" and not network.has_qdq:
        amax = _calibrate(logger, network, config)
        if amax is None:
            return None
    _use_timing_cache(config, network.onnx, precision)
    g = fake_cudart.STATE.gpu  # the building thread's current device
    profile = config.profiles[0] if config.profiles else None
    level = trt.HardwareCompatibilityLevel(config.hardware_compatibility_level)
    header = {
        "trt_version": trt.__version__,
        "device_name": g.name,
        "device_index": fake_cudart.current_device(),
        "compute_capability": [g.major, g.minor],
        "precision": precision,
        "explicit_quantization": network.has_qdq,
        "version_compatible": config.has("VERSION_COMPATIBLE"),
        "hardware_compatibility": level.name,
        "plugins": network.plugin_ops,
        "workspace": config.pool_limits.get(trt.MemoryPoolType.WORKSPACE),
        "profile": {
            t.name: [list(d) for d in profile.shapes[t.name]]
            if profile and t.name in profile.shapes
            else [list(t.shape)] * 3
            for t in network._inputs
        },
        "inputs": [[t.name, list(t.shape), int(t.dtype)] for t in network._inputs],
        "outputs": [[t.name, list(t.shape), int(t.dtype)] for t in network._outputs],
        "int8_amax": amax,
        "onnx_sha256": hashlib.sha256(network.onnx).hexdigest(),
    }
    with trt.STATE.lock:
        trt.STATE.builds.append(header)
    return trt._pack(header, network.onnx)


def _precision(
    logger: trt.ILogger, network: trt.INetworkDefinition, config: trt.IBuilderConfig
) -> str | None:
    """What the plan computes in. Strongly typed networks take it from the model's types."""
    flags = [f for f in ("FP16", "INT8") if config.has(f)]
    if network.strongly_typed:
        if flags:
            trt._error(logger, f"BuilderFlag {flags} is not allowed with strongly typed networks")
            return None
        if trt.major() < 11 and config.int8_calibrator is not None:
            trt._error(logger, "An INT8 calibrator cannot be used with strongly typed networks")
            return None
        return "int8" if network.has_qdq else "fp16" if network.float16_model else "fp32"
    if network.has_qdq and "INT8" not in flags:
        trt._error(logger, "Q/DQ layers need BuilderFlag.INT8 or a strongly typed network to build")
        return None
    return "int8" if "INT8" in flags else "fp16" if "FP16" in flags else "fp32"


def _profiles_valid(
    logger: trt.ILogger, network: trt.INetworkDefinition, config: trt.IBuilderConfig
) -> bool:
    dynamic = [t for t in network._inputs if -1 in t.shape]
    if dynamic and not config.profiles:
        trt._error(
            logger,
            "Network has dynamic or shape inputs, but no optimization profile has been defined.",
        )
        return False
    names = {t.name for t in network._inputs}
    for index, profile in enumerate(config.profiles):
        unknown = set(profile.shapes) - names
        if unknown:
            trt._error(
                logger, f"Optimization profile {index} names unknown inputs {sorted(unknown)}"
            )
            return False
        for t in network._inputs:
            shapes = profile.shapes.get(t.name)
            if shapes is None:
                if t in dynamic:
                    trt._error(
                        logger, f"Optimization profile {index} is missing values for {t.name}"
                    )
                    return False
                continue
            for dims in shapes:
                if len(dims) != len(t.shape) or any(
                    n != -1 and n != d for n, d in zip(t.shape, dims, strict=True)
                ):
                    trt._error(
                        logger,
                        f"Optimization profile {index}: {t.name} dims {tuple(dims)} contradict "
                        f"network dims {tuple(t.shape)}",
                    )
                    return False
    return True


def _calibrate(
    logger: trt.ILogger, network: trt.INetworkDefinition, config: trt.IBuilderConfig
) -> dict[str, float] | None:
    cal = config.int8_calibrator
    if cal is None:
        trt._error(logger, "Calibration failure occurred with no scaling factors detected.")
        return None
    if not getattr(cal, "_initialized", False):
        raise trt.FakeMisuseError("calibrator subclass did not call the base __init__")
    cached = cal.read_calibration_cache()
    if cached:
        data = bytes(cached)
        if data.startswith(trt._CALIB_MAGIC):
            return json.loads(data[len(trt._CALIB_MAGIC) :])
        trt._log(logger, trt._Severity.WARNING, "calibration cache unreadable; recalibrating")
    shapes = _calibration_shapes(logger, network, config)
    if shapes is None:
        return None
    cal.get_batch_size()  # TensorRT still queries it (deprecated in 10.x)
    names = [t.name for t in network._inputs]
    amax = dict.fromkeys(names, 0.0)
    batches = 0
    while True:
        pointers = cal.get_batch(names)
        if not pointers:
            break
        if len(pointers) != len(names):
            raise trt.FakeMisuseError(f"get_batch returned {len(pointers)} pointers for {names}")
        for name, ptr in zip(names, pointers, strict=True):
            t = next(t for t in network._inputs if t.name == name)
            dtype = np.dtype(trt.nptype(t.dtype))
            nbytes = int(np.prod(shapes[name])) * dtype.itemsize
            values = np.frombuffer(fake_cudart.read_device(int(ptr), nbytes), dtype=dtype)
            amax[name] = max(amax[name], float(np.abs(values.astype(np.float64)).max()))
        batches += 1
    if not batches:
        trt._error(logger, "Calibration failure: the calibrator returned no batches")
        return None
    trt.STATE.calibration_batches += batches
    cal.write_calibration_cache(memoryview(trt._CALIB_MAGIC + json.dumps(amax).encode()))
    return amax


def _calibration_shapes(
    logger: trt.ILogger, network: trt.INetworkDefinition, config: trt.IBuilderConfig
) -> dict[str, tuple[int, ...]] | None:
    shapes: dict[str, tuple[int, ...]] = {}
    for t in network._inputs:
        if -1 in t.shape:
            prof = config.calibration_profile
            if prof is None or t.name not in prof.shapes:
                trt._error(
                    logger, "Calibration profile must be set for networks with runtime dimensions"
                )
                return None
            shapes[t.name] = tuple(prof.shapes[t.name][1])  # TensorRT calibrates at OPT
        else:
            shapes[t.name] = tuple(t.shape)
    return shapes


def _use_timing_cache(config: trt.IBuilderConfig, onnx_bytes: bytes, precision: str) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        return
    key = hashlib.sha256(onnx_bytes + precision.encode()).hexdigest()[:16]
    if cache.device != trt.device_tag():
        raise trt.FakeMisuseError("timing cache of another device/TensorRT attached")
    if key in cache.entries:
        trt.STATE.timing_cache_hits += 1
    else:
        cache.entries[key] = "tactic-0"
