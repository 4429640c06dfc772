"""``parse_infer_body``: the two request shapes ``POST /v1/infer`` accepts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.ingress import MAX_REQUESTS_PER_CALL, parse_infer_body
from shared.messages import EntryPath, InferenceRequest

CAT = "gs://triggerfish-images/cat.jpg"
NORMALIZED = {
    "uri": CAT,
    "generation": "1795239515643133",
    "model": "mobilenet_v2",
    "request_id": "triggerfish-images/cat.jpg#1795239515643133",
    "entry_path": "upload",
}


def test_normalized_requests_from_the_functions_are_taken_as_they_are() -> None:
    other = {
        "uri": "gs://triggerfish-images/dog.jpg",
        "request_id": "m-1/1",
        "entry_path": "pubsub",
    }

    requests = parse_infer_body({"requests": [NORMALIZED, other]})

    assert requests == [InferenceRequest(**NORMALIZED), InferenceRequest(**other)]
    assert [r.entry_path for r in requests] == [EntryPath.UPLOAD, EntryPath.PUBSUB]


def test_a_client_uri_becomes_one_http_request_with_a_fresh_id() -> None:
    [request] = parse_infer_body({"uri": CAT, "model": "mobilenet_v2", "version": "1"})

    assert (request.uri, request.model, request.version) == (CAT, "mobilenet_v2", "1")
    assert request.entry_path is EntryPath.HTTP
    assert request.request_id.startswith("http-")
    assert parse_infer_body({"uri": CAT})[0].request_id != request.request_id


def test_client_uris_become_indexed_http_requests() -> None:
    requests = parse_infer_body({"uris": [CAT, CAT], "request_id": "batch-1"})

    assert [r.request_id for r in requests] == ["batch-1/0", "batch-1/1"]
    assert {r.entry_path for r in requests} == {EntryPath.HTTP}


@pytest.mark.parametrize("body", [[NORMALIZED], "uri", None, 3])
def test_a_body_that_is_not_an_object_is_refused(body: object) -> None:
    with pytest.raises(ValueError, match="body must be a JSON object"):
        parse_infer_body(body)


@pytest.mark.parametrize(
    "requests",
    [[], NORMALIZED, "x", [NORMALIZED] * (MAX_REQUESTS_PER_CALL + 1)],
    ids=["empty", "dict", "str", "too-many"],
)
def test_requests_must_be_a_list_of_1_to_100(requests: object) -> None:
    with pytest.raises(ValueError, match=r"'requests' must be a list of 1\.\.100 requests"):
        parse_infer_body({"requests": requests})


@pytest.mark.parametrize(
    "bad",
    [
        {k: v for k, v in NORMALIZED.items() if k != "request_id"},
        {**NORMALIZED, "entry_path": "carrier-pigeon"},
        {**NORMALIZED, "generation": "v2"},
        {**NORMALIZED, "priority": "high"},
    ],
    ids=["no-request-id", "bad-entry-path", "bad-generation", "extra-field"],
)
def test_an_invalid_normalized_request_is_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        parse_infer_body({"requests": [NORMALIZED, bad]})


@pytest.mark.parametrize(
    "body",
    [{}, {"uri": CAT, "uris": [CAT]}, {"uris": []}, {"uri": CAT, "colour": "red"}, {"uri": ""}],
    ids=["neither", "both", "empty-uris", "extra-field", "empty-uri"],
)
def test_an_invalid_client_message_is_refused(body: dict) -> None:
    with pytest.raises(ValidationError):
        parse_infer_body(body)
