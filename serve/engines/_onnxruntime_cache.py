"""ONNX Runtime through the engine cache: the "engine" is the offline-optimized model.

ONNX Runtime's graph optimizations run at every session creation; with
``SessionOptions.optimized_model_filepath`` they run once, the optimized model
is cached like a TensorRT plan (same key scheme, same levels), and sessions are
created from it with optimizations off. Level-ALL optimized models can contain
hardware-specific layouts and fused kernels, so the key names the CPU model, or
for the CUDA execution provider the GPU, and the providers.
"""

from __future__ import annotations

import logging
import platform
import tempfile
from collections.abc import Sequence
from pathlib import Path

from serve.engines._onnx_info import inspect_model
from serve.engines.base import EngineSpec
from serve.engines.cache import EngineCache, EngineCacheKey, IncompatibleEngineError
from serve.engines.onnxruntime import (
    OnnxRuntimeEngine,
    cpu_parallelism,
    provider_list,
    session_options,
)
from serve.gpus import gpu_name_from_proc, query_gpu
from shared.errors import ConfigError

logger = logging.getLogger("serve.engines.onnxruntime")

# TensorRT EP compiles nodes that cannot be serialized into an optimized model.
_CACHEABLE = ("CUDAExecutionProvider", "CPUExecutionProvider")


def cpu_identity() -> str:
    """``x86_64:<CPU model name>``: what an ORT_ENABLE_ALL optimized model is specific to."""
    name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass  # not Linux: platform.processor() is the best there is
    return f"{platform.machine()}:{name}"


def gpu_identity(device: int = 0) -> tuple[str, str]:
    """``(GPU name, "sm_XY")`` of CUDA device ``device``, without importing CUDA bindings
    (only the TensorRT backend does): from ``nvidia-smi``, else the driver's /proc files.
    Unknown parts read ``unknown``."""
    answer = query_gpu(device, "name,compute_cap")  # older drivers lack compute_cap
    if answer is not None:
        name, cap = answer
        return name, "sm_" + cap.replace(".", "")
    return gpu_name_from_proc(device) or "unknown GPU", "unknown"


def choose_providers(providers: Sequence[str] | None) -> list[str]:
    """The providers to optimize and run with: the given ones, or the best cacheable ones."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = list(providers) if providers else [p for p in _CACHEABLE if p in available]
    bad = [p for p in wanted if p not in _CACHEABLE or p not in available]
    if bad:
        raise ConfigError(
            f"ONNX Runtime providers {bad} cannot be used with the engine cache "
            f"(cacheable and available: {[p for p in _CACHEABLE if p in available]})"
        )
    return wanted


def onnxruntime_cache_key(
    spec: EngineSpec, model_digest: str, providers: Sequence[str], device: int = 0
) -> EngineCacheKey:
    """The cache key of the ORT-optimized model of ``spec`` on this machine (and GPU
    ``device`` when the CUDA execution provider runs it)."""
    import onnxruntime as ort

    device_name, capability = cpu_identity(), ""
    if "CUDAExecutionProvider" in providers:
        gpu, capability = gpu_identity(device)
        device_name = f"{gpu} / {device_name}"
    return EngineCacheKey(
        onnx_sha256=model_digest,
        backend="onnxruntime",
        backend_version=ort.__version__,
        device_name=device_name,
        compute_capability=capability,
        cuda_version="",
        precision=spec.precision.value,
        batch_sizes=tuple(spec.batch_sizes),
        input_name=spec.input_name,
        input_shape=tuple(spec.input_shape),
        input_dtype=spec.input_dtype,
        options=(("optimization", "all"), ("providers", ",".join(providers))),
    )


def _session_options(intra_op_threads: int | None):  # noqa: ANN202 - ort.SessionOptions
    return session_options(intra_op_threads)


def optimize_model(
    onnx: bytes | Path,
    providers: Sequence[str],
    work_dir: Path | None,
    intra_op_threads: int | None = None,
    device: int = 0,
    gpu_mem_limit: int | None = None,
) -> bytes:
    """Run ORT's level-ALL graph optimizations once and return the optimized model bytes.

    ``onnx`` is the model's bytes or, for models with external weights, its path.
    """
    import onnxruntime as ort

    if work_dir is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir, prefix=".ort-optimize-") as tmp:
        target = Path(tmp) / "optimized.onnx"
        options = _session_options(intra_op_threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(target)
        # ORT warns that ENABLE_ALL output is hardware specific; the cache key carries
        # cpu_identity() for exactly that reason, so the warning is noise here.
        options.log_severity_level = 3
        source = str(onnx) if isinstance(onnx, Path) else onnx
        ort.InferenceSession(
            source, options, providers=provider_list(providers, device, gpu_mem_limit)
        )
        return target.read_bytes()


def session_engine(
    spec: EngineSpec,
    optimized: bytes | str,
    providers: Sequence[str],
    intra_op_threads: int | None = None,
    device: int = 0,
    gpu_mem_limit: int | None = None,
) -> OnnxRuntimeEngine:
    """An :class:`OnnxRuntimeEngine` over an already-optimized model (on the CUDA provider,
    an arena of at most ``gpu_mem_limit`` bytes).

    Raises:
        IncompatibleEngineError: ONNX Runtime cannot load the bytes (corrupt, or made by
            another version); the cache discards them and rebuilds.
        ConfigError: the model lacks the configured input or outputs.
    """
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    parallelism = cpu_parallelism(providers[0], intra_op_threads)
    options = _session_options(parallelism.threads)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done offline
    try:
        session = ort.InferenceSession(
            optimized, options, providers=provider_list(providers, device, gpu_mem_limit)
        )
    except (
        ort_errors.Fail,
        ort_errors.InvalidGraph,
        ort_errors.InvalidProtobuf,
        ort_errors.NotImplemented,
        ort_errors.RuntimeException,
        ort_errors.InvalidArgument,
    ) as err:
        raise IncompatibleEngineError(
            f"ONNX Runtime {ort.__version__} cannot load the optimized model: {err}"
        ) from err
    return OnnxRuntimeEngine.over_session(spec, session, providers[0], parallelism, device)


def load_onnxruntime_cached(
    spec: EngineSpec,
    cache: EngineCache,
    *,
    providers: Sequence[str] | None = None,
    intra_op_threads: int | None = None,
    validate=None,  # noqa: ANN001 - same callable as EngineCache.get_or_build's
    device: int = 0,
    gpu_mem_limit: int | None = None,
):  # noqa: ANN201 - CacheResult[OnnxRuntimeEngine]
    """Load ``spec`` on ONNX Runtime through ``cache`` (optimizing the model on a miss),
    on CUDA device ``device`` when the CUDA execution provider is available, its arena
    capped at ``gpu_mem_limit`` bytes (a runtime setting: not part of the cache key)."""
    chosen = choose_providers(providers)
    path = Path(spec.onnx_path)
    model = inspect_model(path)
    source: bytes | Path = path if model.external_files else path.read_bytes()
    key = onnxruntime_cache_key(spec, model.digest, chosen, device)
    work_dir = getattr(cache.disk, "root", None)
    return cache.get_or_build(
        key,
        build=lambda: optimize_model(
            source, chosen, work_dir, intra_op_threads, device, gpu_mem_limit
        ),
        load=lambda data: session_engine(
            spec, data, chosen, intra_op_threads, device, gpu_mem_limit
        ),
        validate=validate,
        info={"model": spec.model, "version": spec.version, "providers": chosen, "device": device},
    )
