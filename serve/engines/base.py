"""The ``Engine`` protocol and the cheap spec that says what to load.

An :class:`EngineSpec` is a small frozen value that can be built, compared and
hashed anywhere; turning it into an :class:`Engine` (``load_engine``) is the
heavy step that happens once per replica.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from serve.model_config import Backend, Precision


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
