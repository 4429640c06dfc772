"""What a TensorRT plan is specific to: the device identity, the cache key and the
timing-cache file name. Nothing here imports ``tensorrt`` or ``cuda``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from serve.engines.base import EngineSpec, HardwareCompatibility
from serve.engines.cache import EngineCacheKey
from serve.model_config import Precision


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What a TensorRT plan is specific to; part of every engine cache key.

    Attributes:
        tensorrt_version: With the build number (``10.3.0.26``): plans only load on the
            exact build that made them.
        cuda_runtime_version: The CUDA runtime TensorRT runs on (not cuda-python's own).
    """

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


def engine_cache_key(
    spec: EngineSpec,
    model_digest: str,
    identity: DeviceIdentity,
    *,
    precision: Precision | None = None,
    options: Mapping[str, str] | None = None,
) -> EngineCacheKey:
    """The cache key of a TensorRT plan for ``spec`` on ``identity``.

    ``model_digest`` covers the ONNX file and its external weights. The driver version is
    left out on purpose: plans survive driver upgrades, and keying on it would make every
    node upgrade rebuild every engine; it is recorded in metadata. Compatibility options
    widen what the key names: a hardware-compatible plan is keyed by its level instead of
    the GPU, a version-compatible one by TensorRT's major instead of its build.
    """
    compat = spec.compatibility
    device_name, capability = identity.gpu_name, identity.sm
    if compat.hardware is HardwareCompatibility.AMPERE_PLUS:
        device_name, capability = "hardware-compatible:ampere_plus", "sm_80+"
    elif compat.hardware is HardwareCompatibility.SAME_COMPUTE_CAPABILITY:
        device_name = "hardware-compatible:same_compute_capability"
    version = identity.tensorrt_version
    if compat.version_compatible:
        version = f"{version.split('.')[0]}.x (version-compatible, built by {version})"
    extra = {
        "hardware_compatibility": compat.hardware.value,
        "version_compatible": str(compat.version_compatible).lower(),
    }
    return EngineCacheKey(
        onnx_sha256=model_digest,
        backend="tensorrt",
        backend_version=version,
        device_name=device_name,
        compute_capability=capability,
        cuda_version=identity.cuda_runtime_version,
        precision=(precision or spec.precision).value,
        batch_sizes=tuple(spec.batch_sizes),
        input_name=spec.input_name,
        input_shape=tuple(spec.input_shape),
        input_dtype=spec.input_dtype,
        options=tuple(sorted({**extra, **(options or {})}.items())),
    )


def timing_cache_file(directory: Path, spec: EngineSpec, identity: DeviceIdentity) -> Path:
    """The timing-cache file for one (model, GPU, TensorRT build): tactics timed for one
    model on one GPU say little about another, and a shared file would be overwritten by
    whichever builder finished last."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", identity.gpu_name).strip("-").lower()
    return directory / (
        f"{spec.model}-{spec.version}-{gpu}-{identity.sm}-trt{identity.tensorrt_version}.timing"
    )
