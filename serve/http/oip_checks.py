"""Checking an Open Inference Protocol call against its model, and turning outcomes into output tensors.

Plain functions over :mod:`serve.http.oip` values and the model's signature, used by
:mod:`serve.http.oip_service`.
"""

from __future__ import annotations

import numpy as np

from serve.http import oip
from serve.model.answers import Rejection, Retry
from serve.model.batch import ItemOutcome, model_input_shape
from serve.model.signature import ModelSignature, TensorInfo
from serve.model_config import Task
from shared.errors import ErrorReason

IMAGE_INPUT = "image"
MAX_IMAGES_PER_CALL = 100
DETECTION_OUTPUTS = (
    TensorInfo("detection_boxes", "float32", (-1, 4)),
    TensorInfo("detection_scores", "float32", (-1,)),
    TensorInfo("detection_classes", "int32", (-1,)),
    TensorInfo("num_detections", "int32", ()),
)


class Unavailable(oip.ProtocolError):
    """A transient failure: 503 (429 when the model sheds load) with ``Retry-After``."""

    def __init__(self, message: str, retry_after: str, status: int = 503) -> None:
        super().__init__(message, status, "overloaded" if status == 429 else "transient")
        self.retry_after = retry_after


def outputs_of(sig: ModelSignature) -> tuple[TensorInfo, ...]:
    return DETECTION_OUTPUTS if sig.task is Task.DETECTION else sig.outputs


def check_inputs(sig: ModelSignature, request: oip.InferRequest) -> int:
    """The number of images in the call's one input, which must fit the model."""
    if len(request.inputs) != 1:
        raise oip.ProtocolError(
            f"expected exactly one input ({IMAGE_INPUT!r} BYTES or {sig.input.name!r} "
            f"{oip.datatype_of(sig.input.dtype)}), got {len(request.inputs)}"
        )
    [tensor] = request.inputs
    if tensor.datatype == oip.BYTES:
        if tensor.name != IMAGE_INPUT:
            raise oip.ProtocolError(
                f"a BYTES input must be named {IMAGE_INPUT!r}, got {tensor.name!r}"
            )
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise oip.ProtocolError(
                f"input {IMAGE_INPUT!r} must have shape [N] or [N, 1], got {list(tensor.shape)}"
            )
    else:
        expected = (oip.datatype_of(sig.input.dtype), model_input_shape(sig.input))
        if tensor.name != sig.input.name or (tensor.datatype, tuple(tensor.shape[1:])) != expected:
            raise oip.ProtocolError(
                f"input {tensor.name!r} {tensor.datatype}{list(tensor.shape)} does not fit the model: "
                f"give {IMAGE_INPUT!r} BYTES[N] (encoded images) or {sig.input.name!r} "
                f"{expected[0]}{[-1, *expected[1]]}"
            )
    images = tensor.shape[0] if tensor.shape else 0
    if not 1 <= images <= MAX_IMAGES_PER_CALL:
        raise oip.ProtocolError(f"a call takes 1..{MAX_IMAGES_PER_CALL} images, got {images}")
    return images


def check_outputs(sig: ModelSignature, request: oip.InferRequest) -> None:
    if request.outputs is None:
        return
    available = {t.name: t for t in outputs_of(sig)}
    for output in request.outputs:
        if output.name not in available:
            raise oip.ProtocolError(
                f"unknown output {output.name!r} (outputs: {sorted(available)})"
            )
        if output.classification and (
            sig.task is not Task.CLASSIFICATION or len(available[output.name].shape) != 1
        ):
            raise oip.ProtocolError(
                f"output {output.name!r}: classification needs a classifier's [N, classes] output"
            )


def outputs(
    sig: ModelSignature, request: oip.InferRequest, outcomes: list[ItemOutcome | Rejection | Retry]
) -> list[oip.OutputTensor]:
    done = check_outcomes(outcomes)
    wanted = request.outputs or tuple(oip.RequestedOutput(t.name, False) for t in outputs_of(sig))
    if sig.task is Task.DETECTION:
        tensors = _detection_tensors(done)
    else:
        tensors = {}
        for o in wanted:
            if any(d.outputs is None or o.name not in d.outputs for d in done):
                raise oip.ProtocolError(
                    f"the model returned no output {o.name!r}", 500, "inference_failed"
                )
            tensors[o.name] = np.stack([d.outputs[o.name] for d in done])  # type: ignore[index]
    out = []
    for o in wanted:
        value = tensors[o.name]
        if o.classification:
            out.append(
                oip.OutputTensor(
                    o.name, oip.BYTES, oip.classify(value, o.classification, sig.labels)
                )
            )
        else:
            out.append(oip.OutputTensor(o.name, oip.datatype_of(value.dtype), value))
    return out


def check_outcomes(outcomes: list[ItemOutcome | Rejection | Retry], first: int = 0) -> list[ItemOutcome]:
    """Every item's outcome, or the error that answers the whole call (elements numbered from ``first``)."""
    for i, outcome in enumerate(outcomes, first):
        if isinstance(outcome, Retry):
            status = 429 if outcome.overloaded else 503
            raise Unavailable(outcome.message, str(max(1, round(outcome.retry_after_s))), status)
        if isinstance(outcome, Rejection):
            status = 404 if outcome.reason is ErrorReason.UNKNOWN_VERSION else 400
            raise oip.ProtocolError(f"element {i}: {outcome.message}", status, outcome.reason.value)
        if outcome.error_reason is not None:
            raise oip.ProtocolError(
                f"element {i}: {outcome.error_message or outcome.error_reason.value}",
                400,
                outcome.error_reason.value,
            )
    return outcomes  # type: ignore[return-value]


def _detection_tensors(done: list[ItemOutcome]) -> dict[str, np.ndarray]:
    counts = [len(d.detections or []) for d in done]
    most = max(counts, default=0)
    boxes = np.zeros((len(done), most, 4), np.float32)
    scores = np.zeros((len(done), most), np.float32)
    classes = np.zeros((len(done), most), np.int32)
    for i, d in enumerate(done):
        for j, det in enumerate(d.detections or []):
            boxes[i, j] = (det.ymin, det.xmin, det.ymax, det.xmax)
            scores[i, j] = det.score
            classes[i, j] = det.class_id
    return {
        "detection_boxes": boxes,
        "detection_scores": scores,
        "detection_classes": classes,
        "num_detections": np.asarray(counts, np.int32),
    }


__all__ = [
    "DETECTION_OUTPUTS", "IMAGE_INPUT", "MAX_IMAGES_PER_CALL", "Unavailable",
    "check_inputs", "check_outcomes", "check_outputs", "outputs", "outputs_of",
]  # fmt: skip
