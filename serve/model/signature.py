"""What a model version looks like from outside: its tensors, labels and backend.

Built in the model replica from a loaded version and handed to the ingress,
which answers the Open Inference Protocol's metadata calls from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from serve.model.batch import LoadedVersion
from serve.model_config import ClassificationPost, InputSpec, PreprocessSpec, Task


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One engine output: NumPy dtype name and shape without the batch dimension."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelSignature:
    """One loaded model version, as the ingress needs to describe and call it.

    Attributes:
        versions: Versions of the model that can be requested (quarantined ones left out).
        backend: What runs the version, e.g. ``onnxruntime:CPUExecutionProvider``.
        outputs: The engine's output tensors, as seen when the version was warmed up.
        score_output: The output a classifier's labels are computed from, else ``None``.
        ready: The replica is healthy.
        engine_source: Where the engine came from (``memory``/``disk``/``gcs``/``shared``/``built``).
        fallback_reason: Why the preferred backend was refused, when ``backend`` is a fallback.
        decode: ``nvimgcodec:cuda:N`` when the replica decodes images on its GPU, else ``cpu``.
    """

    model: str
    version: str
    versions: tuple[str, ...]
    task: Task
    backend: str
    input: InputSpec
    preprocess: PreprocessSpec
    outputs: tuple[TensorInfo, ...]
    labels: tuple[str, ...]
    score_output: str | None
    max_batch_size: int
    ready: bool = True
    engine_source: str = "unknown"
    fallback_reason: str | None = None
    decode: str = "cpu"


def signature_of(
    loaded: LoadedVersion, versions: Sequence[str], ready: bool = True
) -> ModelSignature:
    """The signature of ``loaded`` among the model's requestable ``versions``."""
    cfg = loaded.config
    post = cfg.postprocess
    return ModelSignature(
        model=loaded.model,
        version=loaded.version,
        versions=tuple(versions) or (loaded.version,),
        task=cfg.task,
        backend=loaded.engine.backend_name,
        input=cfg.input,
        preprocess=cfg.preprocess,
        outputs=tuple(
            TensorInfo(n, dtype, shape) for n, (dtype, shape) in loaded.output_specs.items()
        ),
        labels=tuple(loaded.labels),
        score_output=post.output if isinstance(post, ClassificationPost) else None,
        max_batch_size=cfg.batching.max_batch_size,
        ready=ready,
        engine_source=loaded.engine_source,
        fallback_reason=loaded.fallback_reason,
        decode=loaded.decode,
    )
