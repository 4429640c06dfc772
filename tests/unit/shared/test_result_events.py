"""Result events: one results-bucket notification read back as what the result says."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from shared.errors import ErrorReason
from shared.messages import EntryPath, InferenceRequest
from shared.result_events import (
    MalformedNotification,
    ResultEvent,
    ResultKind,
    parse_result_notification,
    result_kind,
)
from shared.result_store import result_metadata
from shared.results import (
    Detection,
    InferenceResult,
    Label,
    ModelRef,
    SourceRef,
    Status,
    invalid_source_object_name,
    superseded_error_object_name,
)

DATA = Path(__file__).resolve().parents[2] / "data"


def _recorded() -> tuple[dict[str, str], bytes]:
    message = json.loads((DATA / "gcs_results_notification.json").read_text())["message"]
    return message["attributes"], base64.b64decode(message["data"])


def _notification(
    name: str, metadata: dict[str, str], generation: str = "7"
) -> tuple[dict[str, str], bytes]:
    attributes = {
        "eventType": "OBJECT_FINALIZE",
        "payloadFormat": "JSON_API_V1",
        "bucketId": "results",
        "objectId": name,
        "objectGeneration": generation,
        "eventTime": "2026-11-21T05:38:36Z",
    }
    resource: dict[str, Any] = {
        "bucket": "results",
        "name": name,
        "generation": generation,
        "metadata": metadata,
    }
    return attributes, json.dumps(resource).encode()


def _ok(**update: Any) -> InferenceResult:
    result = InferenceResult(
        source=SourceRef(uri="gs://images/cat.jpg", generation="42"),
        model=ModelRef(name="mobilenet_v2", version="1"),
        status=Status.OK,
        labels=[Label(class_id=281, label="tabby", score=0.87)],
        request_id="r",
        entry_path=EntryPath.UPLOAD,
    )
    return result.model_copy(update=update)


def test_a_recorded_notification_becomes_the_event_of_its_result() -> None:
    event = parse_result_notification(*_recorded())
    assert event == ResultEvent(
        kind=ResultKind.RESULT,
        result_uri="gs://triggerfish-results/mobilenet_v2/triggerfish-images/cat.jpg.json",
        result_generation=1795239516902214,
        source_uri="gs://triggerfish-images/cat.jpg",
        source_generation="1795239515643133",
        model="mobilenet_v2",
        model_version="1",
        status=Status.OK,
        summary={"top_label": "tabby", "top_score": 0.8731},
        event_time="2026-11-21T05:38:36.902214Z",
    )
    assert event.key == (event.result_uri, 1795239516902214)


def test_what_the_store_writes_is_what_the_event_reads() -> None:
    event = parse_result_notification(
        *_notification("m/images/cat.jpg.json", result_metadata(_ok()))
    )
    assert event is not None
    assert (event.source_uri, event.source_generation) == ("gs://images/cat.jpg", "42")
    assert (event.model, event.model_version, event.status) == ("mobilenet_v2", "1", Status.OK)
    assert (event.summary.top_label, event.summary.top_score) == ("tabby", 0.87)
    assert event.summary.describe() == "tabby 0.870"


def test_a_detector_result_is_summarized_by_its_number_of_detections() -> None:
    box = Detection(ymin=0, xmin=0, ymax=1, xmax=1, score=0.9, class_id=1, label="text")
    metadata = result_metadata(_ok(labels=None, detections=[box] * 3))
    event = parse_result_notification(*_notification("text_detector/images/cat.jpg.json", metadata))
    assert event is not None
    assert event.summary.detections == 3
    assert event.summary.top_label is None
    assert event.summary.describe() == "3 detections"


def test_an_error_result_carries_its_reason() -> None:
    request = InferenceRequest(
        uri="gs://images/x.jpg", generation="9", request_id="r", entry_path=EntryPath.UPLOAD
    )
    error = InferenceResult.failure(
        request, ErrorReason.NOT_AN_IMAGE, "no", model="mobilenet_v2", version="1"
    )
    event = parse_result_notification(*_notification("m/images/x.jpg.json", result_metadata(error)))
    assert event is not None
    assert (event.status, event.error_reason) == (Status.ERROR, "not_an_image")
    assert event.summary.describe() == ""


def test_superseded_and_invalid_records_are_marked_not_dropped() -> None:
    meta = {"triggerfish-status": "error", "triggerfish-error-reason": "unknown_version"}
    superseded = superseded_error_object_name("r", "gs://images/cat.jpg")
    invalid = invalid_source_object_name("r", "not a uri")
    assert result_kind(superseded) is ResultKind.SUPERSEDED_ERROR
    assert result_kind(invalid) is ResultKind.INVALID_SOURCE
    assert result_kind("mobilenet_v2/images/_invalid/x.json") is ResultKind.RESULT
    event = parse_result_notification(*_notification(superseded, meta))
    assert event is not None and event.kind is ResultKind.SUPERSEDED_ERROR
    event = parse_result_notification(*_notification(invalid, meta))
    assert event is not None and event.kind is ResultKind.INVALID_SOURCE


def test_other_event_types_and_objects_without_result_metadata_announce_nothing() -> None:
    attributes, data = _recorded()
    assert parse_result_notification({**attributes, "eventType": "OBJECT_DELETE"}, data) is None
    assert (
        parse_result_notification({**attributes, "eventType": "OBJECT_METADATA_UPDATE"}, data)
        is None
    )
    assert parse_result_notification(*_notification("notes/readme.txt", {})) is None
    assert parse_result_notification(*_notification("notes/readme.txt", {"owner": "ops"})) is None


@pytest.mark.parametrize(
    ("attributes", "data", "named"),
    [
        ({"payloadFormat": "NONE"}, b"", "'NONE'"),
        ({}, b"not json", "not JSON"),
        ({}, b"[1]", "list"),
        (
            {},
            json.dumps(
                {
                    "bucket": "results",
                    "name": "a",
                    "generation": "x",
                    "metadata": {"triggerfish-status": "ok"},
                }
            ).encode(),
            "'x'",
        ),  # fmt: skip
        (
            {},
            json.dumps(
                {
                    "bucket": "results",
                    "name": "a",
                    "generation": "1",
                    "metadata": {"triggerfish-status": "maybe"},
                }
            ).encode(),
            "'maybe'",
        ),  # fmt: skip
    ],
)
def test_an_unreadable_notification_is_an_error_naming_the_value(
    attributes: dict[str, str], data: bytes, named: str
) -> None:
    base = {"eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}
    with pytest.raises(MalformedNotification, match=named):
        parse_result_notification({**base, **attributes}, data)
