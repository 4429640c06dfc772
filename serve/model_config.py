"""The per-version model config (``config.yaml`` beside ``model.onnx``).

Validated with pydantic so that a wrong field fails when the repository is
read, with a message naming the file and the field, not at the first request.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ConfigError


class Task(StrEnum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class Backend(StrEnum):
    ONNXRUNTIME = "onnxruntime"
    TENSORRT = "tensorrt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """The model's image input tensor."""

    name: str = "input"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    dtype: Literal["float32", "float16", "uint8"] = "float32"
    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)
    channels: Literal[3] = 3


class PreprocessSpec(_Strict):
    """How a decoded RGB image becomes the input tensor.

    ``resize``: ``center_crop`` scales the shorter side to ``crop_ratio`` of the
    target then crops the centre (ImageNet style); ``stretch`` ignores aspect
    ratio; ``letterbox`` keeps aspect ratio and pads with ``pad_value``
    (YOLO style). ``mean``/``std`` apply to pixels scaled by ``scale``.
    """

    resize: Literal["center_crop", "stretch", "letterbox"] = "center_crop"
    crop_ratio: float = Field(default=0.875, gt=0, le=1)
    pad_value: int = Field(default=114, ge=0, le=255)
    channel_order: Literal["RGB", "BGR"] = "RGB"
    scale: float = Field(default=1 / 255, gt=0)
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)

    @model_validator(mode="after")
    def _positive_std(self) -> Self:
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


class ClassificationPost(_Strict):
    kind: Literal["classification"] = "classification"
    output: str = "logits"
    top_k: int = Field(default=5, ge=1, le=100)
    apply_softmax: bool = True


class SsdPost(_Strict):
    """Outputs already decoded (TF Object Detection API style)."""

    kind: Literal["ssd"] = "ssd"
    boxes: str = "detection_boxes"
    scores: str = "detection_scores"
    classes: str = "detection_classes"
    count: str | None = "num_detections"
    box_format: Literal["yxyx", "xyxy"] = "yxyx"
    boxes_normalized: bool = True
    class_offset: int = 0
    score_threshold: float = Field(default=0.3, ge=0, le=1)
    max_detections: int = Field(default=100, ge=1)


class YoloPost(_Strict):
    """Raw YOLO-style output ``[N, 4 + C, A]`` or ``[N, A, 4 + C]`` needing decode + NMS."""

    kind: Literal["yolo"] = "yolo"
    output: str = "output0"
    layout: Literal["channels_first", "anchors_first"] = "channels_first"
    has_objectness: bool = False
    score_threshold: float = Field(default=0.25, ge=0, le=1)
    iou_threshold: float = Field(default=0.45, ge=0, le=1)
    max_detections: int = Field(default=100, ge=1)
    class_agnostic_nms: bool = False


class MaskPost(_Strict):
    """Text/segmentation-style probability map turned into boxes (e.g. DBNet text detectors)."""

    kind: Literal["mask"] = "mask"
    output: str | None = None
    threshold: float = Field(default=0.3, ge=0, le=1)
    min_area: int = Field(default=16, ge=1)
    # DBNet marks a shrunk copy of each region; boxes grow back by area * ratio / perimeter.
    unclip_ratio: float = Field(default=0.0, ge=0, le=10)
    label: str = "text"


PostprocessSpec = Annotated[
    ClassificationPost | SsdPost | YoloPost | MaskPost, Field(discriminator="kind")
]


class BatchingSpec(_Strict):
    """Dynamic batching in the model deployment and the batch sizes engines are built for."""

    max_batch_size: int = Field(default=8, ge=1, le=1024)
    batch_wait_timeout_ms: float = Field(default=10.0, ge=0, le=10_000)
    engine_batch_sizes: tuple[int, ...] = (1, 4, 8)

    @model_validator(mode="after")
    def _sizes_cover_max(self) -> Self:
        sizes = self.engine_batch_sizes
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"engine_batch_sizes must be ascending, unique, >= 1: {sizes}")
        if sizes[-1] < self.max_batch_size:
            raise ValueError(
                f"largest engine batch size {sizes[-1]} is below max_batch_size {self.max_batch_size}"
            )
        return self


class AccuracyGuardSpec(_Strict):
    """Reduced-precision engines must agree with FP32 ONNX Runtime on a validation set.

    ``min_agreement`` holds classifiers' top-1 agreement on the images where FP32's best
    score beats its runner-up by ``confident_margin`` (near-ties are left out: any correct
    engine may swap them), and detectors' box match; classifiers must also keep
    ``min_top5_overlap`` of FP32's top-k classes and a mean centred logit cosine of
    ``min_logit_cosine`` (see ``serve/engines/accuracy_guard.py``).

    The defaults sit between the noise a correct engine shows and the damage a broken one
    does, measured on MobileNetV2 and its 256 validation views with
    ``python -m infra.modelprep.guard_noise`` (figures in that module's docstring).
    """

    validation_dir: str = "validation"
    # Measured (worst correct engine, ONNX Runtime's static INT8 / best broken one):
    # top1_confident 0.9627 / 0.8582, top5_overlap 0.8859 / 0.8227, logit_cosine
    # 0.9874 / 0.9679; FP32 under other threads or graph optimisations agrees exactly.
    min_agreement: float = Field(default=0.95, ge=0, le=1)
    iou_match: float = Field(default=0.5, gt=0, le=1)
    confident_margin: float = Field(default=0.2, ge=0)
    min_top5_overlap: float = Field(default=0.85, ge=0, le=1)
    min_logit_cosine: float = Field(default=0.98, ge=0, le=1)


class TensorRTSpec(_Strict):
    """Portability of TensorRT plans, traded against speed.

    ``version_compatible``: the plan embeds a lean runtime and also loads on later
    TensorRT releases of the same major. ``hardware_compatibility``: ``ampere_plus`` plans
    run on any Ampere or later GPU, ``same_compute_capability`` on any GPU of the compute
    capability they were built on; ``none`` (fastest) ties a plan to its GPU.
    """

    version_compatible: bool = False
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"


class ModelConfig(_Strict):
    """Everything needed to serve one model version."""

    task: Task
    input: InputSpec
    preprocess: PreprocessSpec = PreprocessSpec()
    postprocess: PostprocessSpec
    labels: str | None = "labels.txt"
    batching: BatchingSpec = BatchingSpec()
    precision: Precision = Precision.FP32
    backends: tuple[Backend, ...] = (Backend.TENSORRT, Backend.ONNXRUNTIME)
    accuracy_guard: AccuracyGuardSpec = AccuracyGuardSpec()
    tensorrt: TensorRTSpec = TensorRTSpec()
    description: str = ""

    @model_validator(mode="after")
    def _task_matches_postprocess(self) -> Self:
        is_cls = isinstance(self.postprocess, ClassificationPost)
        if is_cls != (self.task is Task.CLASSIFICATION):
            raise ValueError(
                f"task {self.task.value!r} does not fit postprocess kind {self.postprocess.kind!r}"
            )
        if not self.backends:
            raise ValueError("backends must name at least one backend")
        return self


def preparation_key(input: InputSpec, preprocess: PreprocessSpec) -> str:
    """Equal for two versions exactly when a CPU-prepared image suits both."""
    return f"{input.model_dump_json()}|{preprocess.model_dump_json()}"


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a ``config.yaml`` (or ``.json``: YAML is a superset).

    Raises:
        ConfigError: naming the file and every bad field.
    """
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read model config {path}: {err}") from err
    return parse_model_config(raw, source=str(path))


def parse_model_config(raw: object, source: str) -> ModelConfig:
    """Validate an already-parsed config mapping; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"model config {source} must be a mapping, got {type(raw).__name__}")
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as err:
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"invalid model config {source}: {fields}") from err
