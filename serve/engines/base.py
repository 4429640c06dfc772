"""The ``Engine`` protocol and the cheap spec that says what to load.

An :class:`EngineSpec` is a small frozen value that can be built, compared and
hashed anywhere; turning it into an :class:`Engine` (``load_engine``) is the
heavy step that happens once per replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from serve.model_config import Backend, Precision
from shared.errors import TriggerfishError

__all__ = [
    "Engine",
    "EngineCompatibility",
    "EngineFault",
    "EngineSpec",
    "HardwareCompatibility",
    "engine_healthy",
    "load_engine",
    "warm_up_batch_sizes",
]


class EngineFault(TriggerfishError):
    """The engine's device is in an unrecoverable state (a sticky CUDA error such as
    ``cudaErrorIllegalAddress``): every later call on this process's CUDA context fails.

    Not the input's fault, so it must not become an ``inference_failed`` result for the
    batch; the replica holding the engine is unhealthy and has to be replaced.
    """


class HardwareCompatibility(StrEnum):
    """Which GPUs a TensorRT plan may run on (TensorRT's hardware compatibility level)."""

    NONE = "none"  # the compute capability it was built on (fastest)
    AMPERE_PLUS = "ampere_plus"  # any Ampere or later GPU
    SAME_COMPUTE_CAPABILITY = "same_compute_capability"


@dataclass(frozen=True, slots=True)
class EngineCompatibility:
    """Portability of a TensorRT plan, traded against speed.

    Attributes:
        version_compatible: The plan embeds a lean runtime and loads on later TensorRT
            releases of the same major version.
        hardware: GPUs the plan may run on.
    """

    version_compatible: bool = False
    hardware: HardwareCompatibility = HardwareCompatibility.NONE

    @property
    def is_default(self) -> bool:
        return not self.version_compatible and self.hardware is HardwareCompatibility.NONE


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What to load: one ONNX model version for one backend and precision.

    Attributes:
        model: Model name in the repository.
        version: Model version.
        onnx_path: Local path of ``model.onnx``.
        input_name: Name of the image input tensor.
        input_shape: Input shape without the batch dimension, e.g. ``(3, 224, 224)``.
        input_dtype: NumPy dtype name of the input tensor.
        output_names: Output tensors the postprocessor reads, in order.
        precision: Arithmetic precision the engine runs at.
        batch_sizes: Batch sizes the engine is built for (ascending); the last is the max.
        workers: Concurrent ``infer`` callers the engine must support.
        compatibility: TensorRT plan portability (ignored by other backends).
    """

    model: str
    version: str
    onnx_path: Path
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    output_names: tuple[str, ...]
    precision: Precision = Precision.FP32
    batch_sizes: tuple[int, ...] = (1, 4, 8)
    workers: int = 1
    compatibility: EngineCompatibility = field(default_factory=EngineCompatibility)

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]


@runtime_checkable
class Engine(Protocol):
    """A loaded model that maps an input batch to named output arrays."""

    @property
    def backend_name(self) -> str:
        """What actually runs, e.g. ``onnxruntime:CPUExecutionProvider`` or ``tensorrt:fp16:sm_90``."""
        ...

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run one batch (leading dimension N) and return outputs whose leading dimension is N."""
        ...

    def close(self) -> None:
        """Release device memory, sessions and contexts."""
        ...


def engine_healthy(engine: object) -> bool:
    """Whether ``engine`` can still serve: False once it reported a sticky device fault.

    Engines without a ``healthy`` property (CPU backends) are always healthy.
    """
    return bool(getattr(engine, "healthy", True))


def warm_up_batch_sizes(engine: object, sizes: Sequence[int]) -> tuple[int, ...]:
    """The batch sizes a warm-up of ``engine`` runs, out of the version's ``sizes``.

    Every size, unless the engine says fewer are enough (``warm_up_sizes``): its first
    run at each size is what a warm-up takes off the request path.
    """
    chooser = getattr(engine, "warm_up_sizes", None)
    return tuple(chooser(sizes)) if chooser is not None else tuple(sizes)


def load_engine(spec: EngineSpec, backend: Backend, **options: object) -> Engine:
    """Load ``spec`` on ``backend``; backends are imported lazily so a missing
    GPU dependency fails here, with its install hint, and not at package import."""
    if backend is Backend.ONNXRUNTIME:
        from serve.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine.load(spec, **options)
    if backend is Backend.TENSORRT:
        from serve.engines.tensorrt import TensorRTEngine

        return TensorRTEngine.load(spec, **options)
    raise ValueError(f"unknown backend {backend!r}")
