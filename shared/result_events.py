"""Result events: one per stored result, read from the results bucket's notification.

Cloud Storage publishes an ``OBJECT_FINALIZE`` notification (payload ``JSON_API_V1``)
for every object written to the results bucket to the results topic. Only a write
that wins creates an object (:mod:`shared.result_store` conditions every write on the
generation it read), so there is exactly one finalize per first write and per
replacement, and Cloud Storage sends it once the object is readable. The object
resource in the payload carries the custom metadata of :func:`result_metadata`, so
an event says what the result says without reading it: nothing on the hot path
publishes anything.

Delivery is at least once. A consumer keeps, per ``result_uri``, the highest
``result_generation`` it has seen and drops an event with a lower one: that event
describes a result a later write has already replaced. Two events with the same
``result_uri`` and ``result_generation`` are duplicates with the same content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from shared.result_store import (
    DETECTIONS_METADATA_KEY,
    ERROR_REASON_METADATA_KEY,
    GENERATION_METADATA_KEY,
    MODEL_METADATA_KEY,
    SOURCE_URI_METADATA_KEY,
    STATUS_METADATA_KEY,
    TOP_LABEL_METADATA_KEY,
    TOP_SCORE_METADATA_KEY,
    VERSION_METADATA_KEY,
)
from shared.results import INVALID_SOURCE_PREFIX, SUPERSEDED_ERROR_PREFIX, Status

FINALIZE_EVENT = "OBJECT_FINALIZE"
JSON_PAYLOAD = "JSON_API_V1"


class MalformedNotification(ValueError):
    """A results-bucket notification that cannot be read; the message names what is wrong."""


class ResultKind(StrEnum):
    """Which record a result event is about (where in the results bucket it lies).

    ``result``: the result of one model for one source object (``MODEL/BUCKET/NAME.json``),
    replaced only by a higher-ranked one. ``superseded_error``: an error result that the
    stored result for its object outranked, kept under ``_superseded/`` for its caller.
    ``invalid_source``: the result of an input that names no valid object (``_invalid/``).
    """

    RESULT = "result"
    SUPERSEDED_ERROR = "superseded_error"
    INVALID_SOURCE = "invalid_source"


class ResultSummary(BaseModel):
    """What an ``ok`` result found: a classifier's top label and score, or a detector's count."""

    model_config = ConfigDict(frozen=True)

    top_label: str | None = None
    top_score: float | None = None
    detections: int | None = None

    def describe(self) -> str:
        if self.top_label is not None:
            score = f" {self.top_score:.3f}" if self.top_score is not None else ""
            return f"{self.top_label}{score}"
        if self.detections is not None:
            return f"{self.detections} detection{'s' if self.detections != 1 else ''}"
        return ""


class ResultEvent(BaseModel):
    """One stored result, as the results topic announces it.

    Attributes:
        kind: Which record this is (:class:`ResultKind`).
        result_uri: ``gs://RESULTS_BUCKET/NAME`` of the result JSON.
        result_generation: Generation of that object. A consumer drops an event whose
            generation is below one it has already seen for the same ``result_uri``.
        source_uri: The input the result is about (as the request named it).
        source_generation: The input's generation the result was computed from.
        model: Model name; ``model_version`` its version.
        status: ``ok`` or ``error``; ``error_reason`` the machine-readable reason of an error.
        summary: Top label and score, or the number of detections (``ok`` results).
        event_time: When Cloud Storage finalized the object.
    """

    model_config = ConfigDict(frozen=True)

    kind: ResultKind
    result_uri: str
    result_generation: int
    source_uri: str | None = None
    source_generation: str | None = None
    model: str | None = None
    model_version: str | None = None
    status: Status
    error_reason: str | None = None
    summary: ResultSummary = ResultSummary()
    event_time: datetime | None = None

    @property
    def key(self) -> tuple[str, int]:
        """Identity of the write this event announces: equal keys are duplicates."""
        return (self.result_uri, self.result_generation)


def result_kind(object_name: str) -> ResultKind:
    """The kind of record stored under ``object_name`` in the results bucket."""
    folder = object_name.split("/", 1)[0]
    if folder == SUPERSEDED_ERROR_PREFIX:
        return ResultKind.SUPERSEDED_ERROR
    if folder == INVALID_SOURCE_PREFIX:
        return ResultKind.INVALID_SOURCE
    return ResultKind.RESULT


def parse_result_notification(attributes: Mapping[str, str], data: bytes) -> ResultEvent | None:
    """The event one results-bucket notification announces.

    Returns ``None`` for what announces no stored result: another event type than
    ``OBJECT_FINALIZE`` (a deletion, a metadata update), or an object without result
    metadata (no ``triggerfish-status``: something other than a result record).

    Raises:
        MalformedNotification: the payload is not a ``JSON_API_V1`` object resource,
            or its result metadata cannot be read; the message names the value.
    """
    event_type = attributes.get("eventType")
    if event_type != FINALIZE_EVENT:
        return None
    payload_format = attributes.get("payloadFormat")
    if payload_format != JSON_PAYLOAD:
        raise MalformedNotification(
            f"payloadFormat is {payload_format!r}: the results notification must send {JSON_PAYLOAD}"
        )
    resource = _object_resource(data)
    metadata = resource.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise MalformedNotification(f"object metadata is {type(metadata).__name__}, not an object")
    if STATUS_METADATA_KEY not in metadata:
        return None
    bucket = resource.get("bucket") or attributes.get("bucketId")
    name = resource.get("name") or attributes.get("objectId")
    generation = resource.get("generation") or attributes.get("objectGeneration")
    if not bucket or not name:
        raise MalformedNotification(
            f"the notification names no object (bucket {bucket!r}, name {name!r})"
        )
    try:
        return ResultEvent(
            kind=result_kind(name),
            result_uri=f"gs://{bucket}/{name}",
            result_generation=generation,
            source_uri=metadata.get(SOURCE_URI_METADATA_KEY),
            source_generation=metadata.get(GENERATION_METADATA_KEY),
            model=metadata.get(MODEL_METADATA_KEY),
            model_version=metadata.get(VERSION_METADATA_KEY),
            status=metadata[STATUS_METADATA_KEY],
            error_reason=metadata.get(ERROR_REASON_METADATA_KEY),
            summary=ResultSummary(
                top_label=metadata.get(TOP_LABEL_METADATA_KEY),
                top_score=metadata.get(TOP_SCORE_METADATA_KEY),
                detections=metadata.get(DETECTIONS_METADATA_KEY),
            ),
            event_time=attributes.get("eventTime") or resource.get("timeCreated"),
        )
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise MalformedNotification(
            f"gs://{bucket}/{name}: {where} is {problem.get('input')!r} ({problem['msg']})"
        ) from err


def _object_resource(data: bytes) -> dict[str, Any]:
    try:
        resource = json.loads(data)
    except ValueError as err:
        raise MalformedNotification(f"the payload is not JSON: {data[:200]!r}") from err
    if not isinstance(resource, dict):
        raise MalformedNotification(
            f"the payload is {type(resource).__name__}, not an object resource"
        )
    return resource
