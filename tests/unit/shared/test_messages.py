"""Wire messages normalized into ``InferenceRequest`` objects."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from shared.errors import ErrorReason, PermanentError
from shared.messages import (
    MAX_JSON_DEPTH,
    MAX_URIS_PER_MESSAGE,
    EntryPath,
    InferenceRequest,
    Priority,
    parse_gcs_notification,
    parse_json_bounded,
    parse_request_message,
    parse_storage_event,
)

CAT = "gs://triggerfish-images/cat.jpg"
DOG = "gs://triggerfish-images/dog.jpg"
FINALIZE = {
    "objectId": "cat.jpg",
    "eventType": "OBJECT_FINALIZE",
    "objectGeneration": "1795239515643133",
    "payloadFormat": "JSON_API_V1",
    "eventTime": "2026-11-21T05:38:35Z",
    "bucketId": "triggerfish-images",
}


def _parse(payload: object, message_id: str = "m-1") -> list[InferenceRequest]:
    return parse_request_message(json.dumps(payload).encode(), message_id)


def _malformed(data: bytes, message_id: str = "m-1") -> PermanentError:
    with pytest.raises(PermanentError) as info:
        parse_request_message(data, message_id)
    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    return info.value


# --- requests topic -------------------------------------------------------------------


def test_a_single_uri_becomes_one_request_with_the_message_id() -> None:
    [request] = _parse({"uri": CAT}, "1234")

    assert request == InferenceRequest(uri=CAT, request_id="1234", entry_path=EntryPath.PUBSUB)
    assert request.model is None and request.version is None and request.generation is None


def test_model_version_and_request_id_are_carried_to_every_request() -> None:
    requests = _parse(
        {"uris": [CAT, DOG], "model": "mobilenet_v2", "version": "3", "request_id": "job-7"}
    )

    assert [r.uri for r in requests] == [CAT, DOG]
    assert {(r.model, r.version, r.entry_path) for r in requests} == {
        ("mobilenet_v2", "3", EntryPath.PUBSUB)
    }


def test_a_single_uri_keeps_the_bare_id_and_several_get_an_index() -> None:
    assert [r.request_id for r in _parse({"uri": CAT, "request_id": "job"})] == ["job"]
    assert [r.request_id for r in _parse({"uris": [CAT], "request_id": "job"})] == ["job"]
    assert [r.request_id for r in _parse({"uris": [CAT, DOG, CAT], "request_id": "job"})] == [
        "job/0",
        "job/1",
        "job/2",
    ]
    assert [r.request_id for r in _parse({"uris": [CAT, DOG]}, "msg-9")] == ["msg-9/0", "msg-9/1"]


def test_a_redelivered_message_maps_to_the_same_requests() -> None:
    body = {"uris": [CAT, DOG]}

    assert _parse(body, "m-5") == _parse(body, "m-5")


def test_invalid_uris_are_kept_as_given_for_the_error_result() -> None:
    [request] = _parse({"uri": "http://nope"})

    assert request.uri == "http://nope"


@pytest.mark.parametrize("data", [b"not json", b"{", b"\xff\xfe\x00"])
def test_a_body_that_is_not_json_is_malformed_naming_the_message(data: bytes) -> None:
    err = _malformed(data, "m-42")

    assert "message m-42 is not JSON" in err.message


@pytest.mark.parametrize(("payload", "kind"), [([CAT], "list"), ("x", "str"), (None, "NoneType")])
def test_a_body_that_is_not_an_object_is_malformed(payload: object, kind: str) -> None:
    err = _malformed(json.dumps(payload).encode())

    assert f"must be a JSON object, got {kind}" in err.message


@pytest.mark.parametrize("payload", [{"uri": CAT, "uris": [DOG]}, {}, {"model": "mobilenet_v2"}])
def test_exactly_one_of_uri_and_uris_is_required(payload: dict) -> None:
    err = _malformed(json.dumps(payload).encode())

    assert "exactly one of 'uri' or 'uris'" in err.message


def test_empty_uris_is_malformed() -> None:
    err = _malformed(b'{"uris": []}')

    assert "'uris' is empty" in err.message


def test_more_than_100_uris_is_malformed() -> None:
    assert _parse({"uris": [CAT] * MAX_URIS_PER_MESSAGE})  # exactly at the limit: fine

    err = _malformed(json.dumps({"uris": [CAT] * (MAX_URIS_PER_MESSAGE + 1)}).encode())

    assert "uris" in err.message
    assert "100" in err.message


def test_an_unknown_field_is_rejected_naming_it() -> None:
    err = _malformed(json.dumps({"uri": CAT, "modle": "resnet"}).encode())

    assert "modle" in err.message
    assert "Extra inputs are not permitted" in err.message


@pytest.mark.parametrize("model", ["../etc/passwd", "-model", "", "a b", "m" * 129])
def test_a_bad_model_name_is_rejected(model: str) -> None:
    err = _malformed(json.dumps({"uri": CAT, "model": model}).encode())

    assert err.message.startswith("message m-1: model:")


@pytest.mark.parametrize("uri", ["", "gs://b/" + "x" * 3000])
def test_a_uri_the_request_model_refuses_is_malformed_not_a_crash(uri: str) -> None:
    """Pydantic errors raised while splitting must not escape as ValidationError."""
    err = _malformed(json.dumps({"uris": [CAT, uri]}).encode())

    assert "uri" in err.message


def test_a_non_string_uri_is_malformed() -> None:
    err = _malformed(json.dumps({"uri": 5}).encode())

    assert "uri" in err.message


# --- GCS notifications ----------------------------------------------------------------


def test_a_finalize_notification_is_read_from_its_attributes() -> None:
    request = parse_gcs_notification(FINALIZE, b"")

    assert request == InferenceRequest(
        uri="gs://triggerfish-images/cat.jpg",
        generation="1795239515643133",
        request_id="triggerfish-images/cat.jpg#1795239515643133",
        entry_path=EntryPath.UPLOAD,
    )


def test_attributes_win_over_the_payload() -> None:
    payload = json.dumps({"bucket": "other-bucket", "name": "dog.jpg", "generation": "5"}).encode()

    request = parse_gcs_notification(FINALIZE, payload)

    assert request is not None
    assert (request.uri, request.generation) == (
        "gs://triggerfish-images/cat.jpg",
        "1795239515643133",
    )


def test_missing_attributes_fall_back_to_the_payload_fields() -> None:
    payload = json.dumps({"bucket": "triggerfish-images", "name": "a/b.png", "generation": 12})

    request = parse_gcs_notification({"eventType": "OBJECT_FINALIZE"}, payload.encode())

    assert request is not None
    assert request.uri == "gs://triggerfish-images/a/b.png"
    assert request.generation == "12"
    assert request.request_id == "triggerfish-images/a/b.png#12"


def test_a_notification_without_generation_is_latest() -> None:
    attributes = {k: v for k, v in FINALIZE.items() if k != "objectGeneration"}

    request = parse_gcs_notification(attributes, b"")

    assert request is not None
    assert request.generation is None
    assert request.request_id == "triggerfish-images/cat.jpg#latest"


@pytest.mark.parametrize("event", ["OBJECT_DELETE", "OBJECT_METADATA_UPDATE", "OBJECT_ARCHIVE"])
def test_events_other_than_finalize_are_not_work(event: str) -> None:
    assert parse_gcs_notification({**FINALIZE, "eventType": event}, b"not even json") is None


def test_a_notification_without_event_type_is_malformed() -> None:
    attributes = {k: v for k, v in FINALIZE.items() if k != "eventType"}

    with pytest.raises(PermanentError) as info:
        parse_gcs_notification(attributes, b"")

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "eventType" in info.value.message


def test_a_notification_payload_that_is_not_json_is_malformed() -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_notification({"eventType": "OBJECT_FINALIZE"}, b"{broken")

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "not JSON" in info.value.message


def test_a_notification_naming_no_object_is_malformed() -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_notification({"eventType": "OBJECT_FINALIZE", "bucketId": "b-1"}, b"{}")

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "bucket='b-1', name=None" in info.value.message


def test_a_non_numeric_generation_is_malformed() -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_notification({**FINALIZE, "objectGeneration": "abc"}, b"")

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "generation" in info.value.message


def test_a_generation_longer_than_an_int64_has_digits_is_malformed() -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_notification({**FINALIZE, "objectGeneration": "1" * 20}, b"")

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "generation" in info.value.message


@pytest.mark.parametrize("generation", ["1" * 20, "9" * 19, "", "-1", "+5", "1e5"])
def test_a_request_refuses_a_generation_that_is_not_an_int64(generation: str) -> None:
    with pytest.raises(ValidationError, match="generation"):
        InferenceRequest(uri=CAT, generation=generation, request_id="r", entry_path=EntryPath.HTTP)


@pytest.mark.parametrize("generation", ["0", "1795239515643133", str(2**63 - 1)])
def test_a_request_accepts_an_int64_generation(generation: str) -> None:
    request = InferenceRequest(
        uri=CAT, generation=generation, request_id="r", entry_path=EntryPath.HTTP
    )

    assert request.generation == generation


def test_an_upload_with_a_long_valid_object_name_is_accepted() -> None:
    name = "d/" * 400 + "cat.jpg"  # 807 bytes: GCS allows 1024

    request = parse_gcs_notification({**FINALIZE, "objectId": name}, b"")

    assert request is not None
    assert request.uri == f"gs://triggerfish-images/{name}"


# --- Eventarc storage events ----------------------------------------------------------


def test_an_eventarc_storage_event_becomes_an_upload_request() -> None:
    data = {
        "bucket": "triggerfish-images",
        "name": "cat.jpg",
        "generation": "1795239515643133",
        "contentType": "image/jpeg",
        "size": "3",
    }

    request = parse_storage_event(data)

    assert request.uri == "gs://triggerfish-images/cat.jpg"
    assert request.generation == "1795239515643133"
    assert request.entry_path is EntryPath.UPLOAD
    assert request.request_id == "triggerfish-images/cat.jpg#1795239515643133"


@pytest.mark.parametrize(
    "data",
    [
        {"name": "cat.jpg"},
        {"bucket": "triggerfish-images"},
        {"bucket": "", "name": "cat.jpg"},
        {"bucket": 3, "name": "cat.jpg"},
    ],
)
def test_an_eventarc_event_without_bucket_or_name_is_malformed(data: dict) -> None:
    with pytest.raises(PermanentError) as info:
        parse_storage_event(data)

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "lacks bucket/name" in info.value.message


def test_eventarc_data_that_is_not_an_object_is_malformed() -> None:
    with pytest.raises(PermanentError) as info:
        parse_storage_event(["cat.jpg"])  # type: ignore[arg-type]

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE


# --- bounded JSON -----------------------------------------------------------------------


def _nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def test_json_nested_up_to_the_limit_is_parsed() -> None:
    value = parse_json_bounded(_nested(MAX_JSON_DEPTH))

    for _ in range(MAX_JSON_DEPTH):
        [value] = value
    assert value == 1


def test_json_nested_one_level_too_deep_is_refused() -> None:
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        parse_json_bounded(_nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError, match="nested deeper"):
        parse_json_bounded(b'{"a": ' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1))


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"uri": "gs://b-1/" + "[{" * 100 + '\\"]' * 10, "n": [[1]]})

    assert parse_json_bounded(text)["n"] == [[1]]
    assert parse_json_bounded(text.encode())["uri"].startswith("gs://b-1/[{[{")


def test_many_shallow_brackets_are_not_deep() -> None:
    payload = json.dumps({"uris": [[CAT]] * 500})

    assert len(parse_json_bounded(payload)["uris"]) == 500


def test_parse_json_bounded_refuses_bytes_that_are_not_utf8() -> None:
    with pytest.raises(ValueError):
        parse_json_bounded(b"\xff{}")


def test_a_hostile_deeply_nested_message_is_refused_quickly_as_malformed() -> None:
    # Deep enough to exhaust the stdlib parser's recursion without the bound.
    data = _nested(200_000).encode()

    started = time.monotonic()
    err = _malformed(data, "m-deep")
    elapsed = time.monotonic() - started

    assert "message m-deep is not JSON" in err.message and "nested deeper" in err.message
    assert elapsed < 2.0


def test_a_deeply_nested_notification_payload_is_malformed() -> None:
    with pytest.raises(PermanentError) as info:
        parse_gcs_notification(FINALIZE, ("{" + '"a":' + "{" * 100_000 + "}" * 100_001).encode())

    assert info.value.reason is ErrorReason.MALFORMED_MESSAGE
    assert "nested deeper" in info.value.message


# --- public request ids ---------------------------------------------------------------------


def test_a_public_callers_request_id_is_namespaced_and_cannot_pose_as_another_entry_paths() -> None:
    from shared.messages import PUBLIC_REQUEST_ID_PREFIX, RequestMessage, public_requests

    upload_id = "triggerfish-images/cat.jpg#1795239515643133"
    [posing] = public_requests(RequestMessage(uri=CAT, request_id=upload_id), "http-fresh")
    several = public_requests(RequestMessage(uris=[CAT, DOG], request_id="job"), "http-fresh")
    [anonymous] = public_requests(RequestMessage(uri=CAT), "http-fresh")

    assert posing.request_id == PUBLIC_REQUEST_ID_PREFIX + upload_id != upload_id
    assert [r.request_id for r in several] == ["http:job/0", "http:job/1"]
    assert anonymous.request_id == "http-fresh"
    assert {posing.entry_path, anonymous.entry_path} == {EntryPath.HTTP}


def test_the_depth_scan_skips_strings_whole_and_stops_past_the_limit() -> None:
    from shared.messages import _depth

    assert _depth('["[[[[", {"a": ["\\"[[", 1]}]') == 3
    assert _depth("[" * 10_000, stop_above=32) == 33


def test_a_message_may_ask_for_bulk_and_a_topic_may_insist_on_it() -> None:
    asked = parse_request_message(b'{"uri": "gs://b/x.jpg", "priority": "bulk"}', "m-1")
    plain = parse_request_message(b'{"uri": "gs://b/x.jpg"}', "m-2")
    forced = parse_request_message(b'{"uri": "gs://b/x.jpg", "priority": "live"}', "m-3", priority=Priority.BULK)

    assert [r.priority for r in (*asked, *plain, *forced)] == [Priority.BULK, Priority.LIVE, Priority.BULK]
    with pytest.raises(PermanentError, match="priority"):
        parse_request_message(b'{"uri": "gs://b/x.jpg", "priority": "urgent"}', "m-4")
