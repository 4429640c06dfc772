"""Errors and small helpers shared by the TensorRT backend's modules.

Nothing here imports ``tensorrt`` or ``cuda``: the modules are passed in by
:mod:`serve.engines.tensorrt`, the only module that imports them.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from serve.engines.base import EngineFault
from shared.errors import ConfigError, TriggerfishError

logger = logging.getLogger("serve.engines.tensorrt")

#: TensorRT majors this backend drives (10.x with its implicit-quantization API, and 11.x,
#: where every network is strongly typed).
SUPPORTED_MAJORS = (10, 11)

INSTALL_HINT = (
    "install the GPU extra (pip install 'triggerfish[gpu]', which brings TensorRT 10.x for "
    "CUDA 12 and a matching cuda-python) or run inside the NVIDIA TensorRT container "
    "(nvcr.io/nvidia/tensorrt)"
)

#: CUDA errors that corrupt the CUDA context: every later call in the process fails too.
STICKY_ERRORS = frozenset(
    {
        "cudaErrorIllegalAddress",
        "cudaErrorLaunchFailure",
        "cudaErrorIllegalInstruction",
        "cudaErrorMisalignedAddress",
        "cudaErrorInvalidAddressSpace",
        "cudaErrorInvalidPc",
        "cudaErrorHardwareStackError",
        "cudaErrorAssert",
        "cudaErrorLaunchTimeout",
        "cudaErrorECCUncorrectable",
        "cudaErrorUnknown",
    }
)


class TensorRTUnavailableError(ConfigError):
    """TensorRT or cuda-python is missing, too old or too new on this machine."""


class UnsupportedPrecisionError(ConfigError):
    """This TensorRT cannot build the model at the configured precision (for example FP16
    or calibrated INT8 on TensorRT 11, whose strongly typed networks take their precision
    from the ONNX model)."""


class TensorRTError(TriggerfishError):
    """A TensorRT or CUDA call failed while loading or running an engine."""


class TensorRTDeviceFault(TensorRTError, EngineFault):
    """A sticky CUDA error: the engine, and the CUDA context it lives in, are unusable."""


def error_name(cudart: ModuleType, err: Any) -> str:
    name_err, name = cudart.cudaGetErrorName(err)
    if name_err == cudart.cudaError_t.cudaSuccess:
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return str(err)


def cuda_call(cudart: ModuleType, result: tuple[Any, ...], what: str) -> Any:
    """Check a cuda-python result tuple ``(err, *values)`` and return the value(s).

    Raises:
        TensorRTDeviceFault: a sticky error (the CUDA context is corrupted).
        TensorRTError: any other error, naming the call and the CUDA error, e.g.
            ``cudaMalloc(4096) failed: cudaErrorMemoryAllocation``.
    """
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        name = error_name(cudart, err)
        if name in STICKY_ERRORS:
            raise TensorRTDeviceFault(f"{what} failed: {name} (the CUDA context is lost)")
        raise TensorRTError(f"{what} failed: {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def version_string(packed: int) -> str:
    """CUDA's packed version (12040) as ``12.4``."""
    return f"{packed // 1000}.{(packed % 1000) // 10}"


def tensorrt_major(trt: ModuleType) -> int:
    """The major version of an imported ``tensorrt`` module (0 when unreadable)."""
    head = str(getattr(trt, "__version__", "0")).split(".")[0]
    return int(head) if head.isdigit() else 0


def check_supported(trt: ModuleType) -> None:
    """Refuse TensorRT releases whose API this backend does not drive.

    Raises:
        TensorRTUnavailableError: naming the version and the supported range.
    """
    version = getattr(trt, "__version__", "?")
    major = tensorrt_major(trt)
    if major < SUPPORTED_MAJORS[0]:
        raise TensorRTUnavailableError(
            f"TensorRT {version} is too old (need >= 10); {INSTALL_HINT}"
        )
    if major > SUPPORTED_MAJORS[-1]:
        raise TensorRTUnavailableError(
            f"TensorRT {version} is newer than this backend supports (10.x, 11.x); {INSTALL_HINT}"
        )


_TRT_DISTRIBUTIONS = (
    "tensorrt",
    "tensorrt-cu12",
    "tensorrt-cu13",
    "tensorrt-cu12-libs",
    "tensorrt-cu13-libs",
    "tensorrt-libs",
)


def tensorrt_full_version(trt: ModuleType) -> str:
    """TensorRT's version including its build number (``10.3.0.26``).

    Wheels from PyPI report it in ``__version__``; builds that report only
    ``major.minor.patch`` are completed from the installed distribution's metadata.
    Plans are only portable between identical builds, so the cache key needs all four.
    """
    version = str(getattr(trt, "__version__", "0"))
    if version.count(".") >= 3:
        return version
    for name in _TRT_DISTRIBUTIONS:
        try:
            found = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if found.startswith(version + ".") and found.count(".") >= 3:
            return found
    return version


_CUDART_LIB = re.compile(r"/libcudart\.so\.(\d+)(?:\.[\d.]+)?$")


def loaded_cuda_runtimes(maps: Path = Path("/proc/self/maps")) -> list[Path]:
    """CUDA runtime libraries mapped into this process (TensorRT loads its own)."""
    try:
        lines = maps.read_text().splitlines()
    except OSError:
        return []
    found = {line.split()[-1] for line in lines if _CUDART_LIB.search(line.split()[-1])}
    return sorted(Path(p) for p in found)


def _runtime_version_of(library: Path) -> int | None:
    try:
        lib = ctypes.CDLL(str(library))  # already loaded: same handle, no second copy
        value = ctypes.c_int()
        if lib.cudaRuntimeGetVersion(ctypes.byref(value)) != 0:
            return None
        return int(value.value)
    except (OSError, AttributeError):
        return None


def tensorrt_cuda_version(
    trt: ModuleType, cudart: ModuleType, runtimes: list[Path] | None = None
) -> str:
    """The CUDA runtime TensorRT runs on, as ``major.minor``.

    cuda-python carries its own statically linked runtime, whose version says nothing
    about the one TensorRT was built for and loaded (``libcudart.so.<major>`` from its
    ``nvidia-cuda-runtime`` dependency or the container). That library is found among
    the process's mapped libraries and asked directly; when TensorRT links its runtime
    statically, the CUDA major of its distribution (``tensorrt-cu12``) is used with
    cuda-python's minor only if the majors agree.
    """
    for library in runtimes if runtimes is not None else loaded_cuda_runtimes():
        packed = _runtime_version_of(library)
        if packed:
            return version_string(packed)
    built_for = _distribution_cuda_major()
    own = cuda_call(cudart, cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    if built_for is None or built_for == own // 1000:
        return version_string(own)
    return f"{built_for}.x"


def _distribution_cuda_major() -> int | None:
    for dist in importlib.metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower().replace("_", "-")
        match = re.fullmatch(r"tensorrt-cu(\d+)(?:-libs|-bindings)?", name)
        if match:
            return int(match.group(1))
    return None


@functools.cache
def trt_logger(trt: ModuleType) -> Any:
    """One ``trt.ILogger`` per TensorRT module, forwarding to :mod:`logging`.

    TensorRT requires the logger to outlive every builder, runtime and engine made
    with it, and warns when different loggers are mixed, hence one cached instance.
    """
    severity = trt.ILogger.Severity
    levels = {
        severity.INTERNAL_ERROR: logging.CRITICAL,
        severity.ERROR: logging.ERROR,
        severity.WARNING: logging.WARNING,
        severity.INFO: logging.DEBUG,  # TensorRT's INFO is per-layer chatter
        severity.VERBOSE: logging.DEBUG,
    }

    class _LoggingBridge(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, sev: object, msg: str) -> None:
            level = levels.get(sev, logging.INFO)
            # Checked first: TensorRT calls back for every message, thousands during a build.
            if logger.isEnabledFor(level):
                logger.log(level, "TensorRT: %s", msg)

    return _LoggingBridge()


def init_plugins(trt: ModuleType) -> None:
    """Register TensorRT's bundled plugins (EfficientNMS_TRT, ...) with its plugin registry.

    ONNX models exported with NMS or other plugin ops fail to parse, and plans using them
    fail to deserialize, until the plugin library is initialized. TensorRT registers each
    creator once, so calling this before every build and load is cheap and safe.
    """
    if not trt.init_libnvinfer_plugins(trt_logger(trt), ""):
        logger.warning("TensorRT's plugin library did not initialize; plugin ops will fail")
