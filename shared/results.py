"""The result record written for every input, and where it is written."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from enum import StrEnum
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.errors import ErrorReason
from shared.gcs_limits import MAX_OBJECT_NAME_BYTES
from shared.messages import EntryPath, InferenceRequest
from shared.uris import GcsUri

INVALID_SOURCE_PREFIX = "_invalid"
# Error results that a stored result outranks (an unknown version for an object with an
# ``ok`` result): kept where the caller finds them by request id.
SUPERSEDED_ERROR_PREFIX = "_superseded"
# The folder of hashed result names. No escaped source name has this segment:
# :func:`_safe_segment` leaves a ``%`` only before ``25``, ``2E`` or ``00``.
HASHED_NAME_SEGMENT = "%sha256"


class Status(StrEnum):
    OK = "ok"
    ERROR = "error"


class SourceRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    uri: str
    generation: str | None = None


class ModelRef(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    version: str | None = None


class Label(BaseModel):
    """One classification: ImageNet-style class id, its name and softmax score."""

    model_config = ConfigDict(frozen=True)

    class_id: int
    label: str
    score: float


class Detection(BaseModel):
    """One detected box in coordinates relative to the image (0..1)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    ymin: float
    xmin: float
    ymax: float
    xmax: float
    score: float
    class_id: int = Field(alias="class")
    label: str


class Timings(BaseModel):
    """Milliseconds spent per stage; ``batch_size`` is the batch this input ran in."""

    fetch_ms: float | None = None
    decode_ms: float | None = None
    queue_wait_ms: float | None = None
    inference_ms: float | None = None
    batch_size: int | None = None
    end_to_end_ms: float | None = None


class ErrorInfo(BaseModel):
    reason: ErrorReason
    message: str


class InferenceResult(BaseModel):
    """What triggerfish concluded about one input; serialized as the result JSON.

    ``backend`` is what ran the model (``onnxruntime:CUDAExecutionProvider``,
    ``tensorrt:fp16:sm90``); ``decode`` who decoded the image (``nvimgcodec:cuda:N``
    on the model replica's GPU, ``cpu`` otherwise); ``engine_source`` where the engine
    came from (the engine cache's ``memory``, ``disk``, ``gcs`` or ``shared``, or
    ``built`` by the replica).
    """

    source: SourceRef
    model: ModelRef
    status: Status
    backend: str | None = None
    decode: str | None = None
    engine_source: str | None = None
    labels: list[Label] | None = None
    detections: list[Detection] | None = None
    timings: Timings = Field(default_factory=Timings)
    error: ErrorInfo | None = None
    request_id: str
    entry_path: EntryPath
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _status_matches_error(self) -> Self:
        if (self.status is Status.ERROR) != (self.error is not None):
            raise ValueError("an error result needs 'error', an ok result must not have it")
        return self

    @classmethod
    def failure(
        cls,
        request: InferenceRequest,
        reason: ErrorReason,
        message: str,
        *,
        model: str,
        version: str | None = None,
    ) -> InferenceResult:
        """Build an ``error`` result for ``request``."""
        return cls(
            source=SourceRef(uri=request.uri, generation=request.generation),
            model=ModelRef(name=model, version=version),
            status=Status.ERROR,
            error=ErrorInfo(reason=reason, message=message),
            request_id=request.request_id,
            entry_path=request.entry_path,
        )

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=2)


def version_sort_key(version: str) -> tuple[int, int, str]:
    """Numeric versions sort numerically and after non-numeric ones (``10`` > ``9``)."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


def _safe_segment(segment: str) -> str:
    """An object-name segment that is safe as a file path: ``.``, ``..`` and ``%`` escaped.

    Escaping ``%`` as well keeps the mapping one-to-one: no two source names share a result.
    """
    segment = segment.replace("%", "%25")
    if segment in ("", ".", ".."):
        return segment.replace(".", "%2E") or "%00"
    return segment


def result_object_name(model: str, source: GcsUri) -> str:
    """Deterministic result path for one source object and model: one object per pair.

    A redelivered message, a retried request, an uploaded-twice event and a
    request served by a newer model version all map to the same name; which
    result the object keeps is decided by :mod:`shared.result_store`. Segments of
    the source name that a filesystem would interpret (``..``, ``.``, empty) are
    escaped, so mirrored results never escape their folder.

    A name that would exceed Cloud Storage's :data:`MAX_OBJECT_NAME_BYTES` (a long
    source name, or one with many escaped ``%``) becomes
    ``MODEL/BUCKET/%sha256/<sha256 of the source name>.json``: as deterministic, and
    the result JSON names the full source in ``source.uri``.
    """
    name = "/".join(_safe_segment(part) for part in source.name.split("/"))
    full = f"{model}/{source.bucket}/{name}.json"
    if len(full.encode()) <= MAX_OBJECT_NAME_BYTES:
        return full
    digest = hashlib.sha256(source.name.encode()).hexdigest()
    return f"{model}/{source.bucket}/{HASHED_NAME_SEGMENT}/{digest}.json"


def invalid_source_object_name(request_id: str, uri: str) -> str:
    """Result path for an input that names no valid object (bad URI, malformed message)."""
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    safe_id = hashlib.sha256(request_id.encode()).hexdigest()[:16]
    return f"{INVALID_SOURCE_PREFIX}/{safe_id}/{digest}.json"


def superseded_error_object_name(request_id: str, uri: str) -> str:
    """Where an error result goes when the stored result for its object outranks it.

    Keyed like :func:`invalid_source_object_name`: by the request id's hash, then the URI's.
    """
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    safe_id = hashlib.sha256(request_id.encode()).hexdigest()[:16]
    return f"{SUPERSEDED_ERROR_PREFIX}/{safe_id}/{digest}.json"
