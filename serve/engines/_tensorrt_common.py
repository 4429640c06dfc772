"""Errors and small helpers shared by the TensorRT backend's modules.

Nothing here imports ``tensorrt`` or ``cuda``: the modules are passed in by
:mod:`serve.engines.tensorrt`, the only module that imports them.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Any

from shared.errors import ConfigError, TriggerfishError

logger = logging.getLogger("serve.engines.tensorrt")

INSTALL_HINT = (
    "install the GPU extra (pip install 'triggerfish[gpu]', which brings tensorrt>=10 and "
    "cuda-python) or run inside the NVIDIA TensorRT container (nvcr.io/nvidia/tensorrt)"
)


class TensorRTUnavailableError(ConfigError):
    """TensorRT or cuda-python is missing or too old on this machine."""


class TensorRTError(TriggerfishError):
    """A TensorRT or CUDA call failed while loading or running an engine."""


def cuda_call(cudart: ModuleType, result: tuple[Any, ...], what: str) -> Any:
    """Check a cuda-python result tuple ``(err, *values)`` and return the value(s).

    Raises:
        TensorRTError: naming the call and the CUDA error, e.g. ``cudaMalloc(4096) failed:
            cudaErrorMemoryAllocation``.
    """
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        name_err, name = cudart.cudaGetErrorName(err)
        text = (
            name.decode(errors="replace")
            if name_err == cudart.cudaError_t.cudaSuccess
            else str(err)
        )
        raise TensorRTError(f"{what} failed: {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def version_string(packed: int) -> str:
    """CUDA's packed version (12040) as ``12.4``."""
    return f"{packed // 1000}.{(packed % 1000) // 10}"


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
