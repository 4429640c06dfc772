"""The Cloud Functions, driven with recorded payloads through functions-framework's real app.

Serve and Cloud Storage are replaced by recorders: ``get_http_client`` returns a
fake whose ``post()`` records the forwarded body, ``store_result`` records the
error results the function writes.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

import functions._forward as forward_module
from shared.errors import ErrorReason
from shared.messages import EntryPath
from shared.result_store import result_name
from shared.results import InferenceResult, Status
from shared.uris import GcsUri

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
SOURCE = ROOT / "functions" / "main.py"
SERVE_URL = "http://serve.test:8000"
REQUESTS_TOPIC_PATH = "/projects/triggerfish-local/topics/triggerfish-requests"
UPLOADS_TOPIC_PATH = "/projects/triggerfish-local/topics/triggerfish-uploads"
CAT = "gs://triggerfish-images/cat.jpg"
GENERATION = "1795239515643133"


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def _push(message: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """The recorded requests-topic push body, with ``message`` as its (JSON) data."""
    body = _load("pubsub_push_request.json")
    if message is not None:
        body["message"]["data"] = base64.b64encode(json.dumps(message).encode()).decode()
    body["message"].update(changes)
    return body


def _notification(**attributes: str) -> dict[str, Any]:
    body = _load("gcs_notification_push.json")
    body["message"]["attributes"].update(attributes)
    return body


@dataclass
class FakeServe:
    """Stands in for the pooled ``httpx.Client``: records posts, answers as told."""

    status: int = 200
    error: Exception | None = None
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def post(self, url: str, json: dict[str, Any]) -> httpx.Response:
        self.posts.append((url, copy.deepcopy(json)))
        request = httpx.Request("POST", url)
        if self.error is not None:
            raise self.error
        if self.status == 200:
            results = [
                {"request_id": r["request_id"], "status": "ok", "result_uri": f"gs://r/{i}.json"}
                for i, r in enumerate(json["requests"])
            ]
            return httpx.Response(200, json={"results": results}, request=request)
        return httpx.Response(self.status, json={"error": "nope", "message": "x"}, request=request)

    @property
    def forwarded(self) -> list[dict[str, Any]]:
        """Every request forwarded, over all calls."""
        return [r for _, body in self.posts for r in body["requests"]]


@dataclass
class Recorded:
    bucket: str
    result: InferenceResult
    source: GcsUri | None

    @property
    def reason(self) -> ErrorReason:
        assert self.result.status is Status.ERROR and self.result.error is not None
        return self.result.error.reason

    @property
    def name(self) -> str:
        return result_name(self.result, self.source)


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, FlaskClient]]:
    path_before = list(sys.path)
    main_before = sys.modules.get("main")
    clients = {
        target: create_app(
            target=target, source=str(SOURCE), signature_type="cloudevent"
        ).test_client()
        for target in ("on_request", "on_upload")
    }
    yield clients
    # create_app puts functions/ on sys.path and the source into sys.modules["main"].
    sys.path[:] = path_before
    if main_before is None:
        sys.modules.pop("main", None)
    else:
        sys.modules["main"] = main_before


@pytest.fixture(autouse=True)
def _environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TRIGGERFISH_SERVE_URL", SERVE_URL + "/")
    monkeypatch.setenv("TRIGGERFISH_RESULTS_BUCKET", "triggerfish-results")
    monkeypatch.setenv("TRIGGERFISH_ALLOWED_BUCKETS", "triggerfish-images,more-images")
    monkeypatch.delenv("TRIGGERFISH_DEFAULT_MODEL", raising=False)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    forward_module.get_settings.cache_clear()
    yield
    forward_module.get_settings.cache_clear()
    root.handlers[:] = handlers  # the handlers install JSON logging on the root logger
    root.setLevel(level)


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> FakeServe:
    fake = FakeServe()
    monkeypatch.setattr(forward_module, "get_http_client", lambda: fake)
    return fake


@pytest.fixture
def stored(monkeypatch: pytest.MonkeyPatch) -> list[Recorded]:
    records: list[Recorded] = []

    def store_result(bucket: str, result: InferenceResult, source: GcsUri | None) -> str:
        records.append(Recorded(bucket, result, source))
        return f"gs://{bucket}/{result_name(result, source)}"

    monkeypatch.setattr(forward_module, "store_result", store_result)
    return records


def _post_push(apps: dict[str, FlaskClient], target: str, body: dict[str, Any], path: str) -> int:
    return apps[target].post(path, json=body).status_code


def _request(apps: dict[str, FlaskClient], body: dict[str, Any]) -> int:
    return _post_push(apps, "on_request", body, REQUESTS_TOPIC_PATH)


def _upload(apps: dict[str, FlaskClient], body: dict[str, Any]) -> int:
    return _post_push(apps, "on_upload", body, UPLOADS_TOPIC_PATH)


def _eventarc(
    apps: dict[str, FlaskClient],
    target: str = "on_upload",
    data: dict[str, Any] | None = None,
    **headers: str,
) -> int:
    recorded = _load("eventarc_storage_finalized.json")
    response = apps[target].post(
        "/",
        headers={**recorded["headers"], **headers},
        data=json.dumps(recorded["data"] if data is None else data),
    )
    return response.status_code


# --- on_request -----------------------------------------------------------------------


def test_a_pubsub_request_is_forwarded_as_one_normalized_request(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _request(apps, _load("pubsub_push_request.json")) == 200

    [(url, body)] = serve.posts
    assert url == f"{SERVE_URL}/v1/infer"
    assert body == {
        "requests": [
            {
                "uri": CAT,
                "model": "mobilenet_v2",
                "request_id": "demo-cat-1",
                "entry_path": "pubsub",
            }
        ]
    }
    assert stored == []


def test_without_request_id_the_pubsub_message_id_is_used(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _request(apps, _push({"uri": CAT, "version": "2"})) == 200

    [request] = serve.forwarded
    assert request["request_id"] == "17254689532971390"
    assert request["version"] == "2"
    assert "model" not in request  # Serve applies its default model


@pytest.mark.parametrize(
    "data",
    [
        b"{not json",
        b'["gs://triggerfish-images/cat.jpg"]',
        b'{"uri": "' + CAT.encode() + b'", "x": 1}',
    ],
    ids=["not-json", "not-object", "unknown-field"],
)
def test_a_malformed_message_is_recorded_and_acknowledged(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded], data: bytes
) -> None:
    body = _push(data=base64.b64encode(data).decode())

    assert _request(apps, body) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.MALFORMED_MESSAGE
    assert record.bucket == "triggerfish-results"
    assert record.source is None and record.name.startswith("_invalid/")
    assert record.result.request_id == "17254689532971390"
    assert record.result.entry_path is EntryPath.PUBSUB
    assert "17254689532971390" in (record.result.error.message if record.result.error else "")


def test_message_data_that_is_not_base64_is_malformed(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _request(apps, _push(data="%%% not base64 %%%")) == 200

    assert serve.posts == []
    assert [r.reason for r in stored] == [ErrorReason.MALFORMED_MESSAGE]
    assert "not base64" in (stored[0].result.error.message if stored[0].result.error else "")


def test_an_invalid_uri_is_recorded_and_not_forwarded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _request(apps, _push({"uri": "https://example.com/cat.jpg", "request_id": "r-1"})) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.INVALID_URI
    assert record.source is None and record.name.startswith("_invalid/")
    assert record.result.source.uri == "https://example.com/cat.jpg"
    assert record.result.model.name == "mobilenet_v2"


def test_a_disallowed_bucket_is_recorded_and_not_forwarded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert (
        _request(apps, _push({"uri": "gs://someone-elses/cat.jpg", "model": "text_detector"}))
        == 200
    )

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.BUCKET_NOT_ALLOWED
    assert record.source == GcsUri("someone-elses", "cat.jpg")
    assert record.name == "text_detector/_/someone-elses/cat.jpg.json"


def test_valid_uris_are_forwarded_together_and_the_invalid_one_recorded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    message = {
        "uris": [CAT, "gs://BAD_bucket/x.jpg", "gs://more-images/dog.jpg"],
        "request_id": "job",
    }

    assert _request(apps, _push(message)) == 200

    assert len(serve.posts) == 1
    assert [(r["uri"], r["request_id"]) for r in serve.forwarded] == [
        (CAT, "job/0"),
        ("gs://more-images/dog.jpg", "job/2"),
    ]
    [record] = stored
    assert record.reason is ErrorReason.INVALID_URI
    assert record.result.request_id == "job/1"


@pytest.mark.parametrize("status", [503, 500, 429, 408])
def test_serve_overloaded_fails_the_function_so_pubsub_redelivers(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded], status: int
) -> None:
    serve.status = status

    assert _request(apps, _load("pubsub_push_request.json")) == 500

    assert len(serve.posts) == 1
    assert stored == []


def test_serve_unreachable_fails_the_function_so_pubsub_redelivers(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    serve.error = httpx.ConnectError("connection refused")

    assert _request(apps, _load("pubsub_push_request.json")) == 500

    assert stored == []


def test_serve_rejecting_the_request_records_errors_and_acknowledges(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    serve.status = 400

    assert (
        _request(apps, _push({"uris": [CAT, "gs://more-images/dog.jpg"], "request_id": "j"})) == 200
    )

    assert len(serve.posts) == 1
    assert [r.reason for r in stored] == [ErrorReason.MALFORMED_MESSAGE] * 2
    assert [r.result.request_id for r in stored] == ["j/0", "j/1"]
    assert [r.name for r in stored] == [
        "mobilenet_v2/_/triggerfish-images/cat.jpg.json",
        "mobilenet_v2/_/more-images/dog.jpg.json",
    ]
    assert "Serve rejected the request (400)" in (
        stored[0].result.error.message if stored[0].result.error else ""
    )


def test_on_request_ignores_an_unexpected_event_type(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _eventarc(apps, target="on_request") == 200

    assert serve.posts == [] and stored == []


# --- on_upload: GCS notifications through Pub/Sub --------------------------------------


def test_a_gcs_notification_is_forwarded_with_generation_and_default_model(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _upload(apps, _load("gcs_notification_push.json")) == 200

    [(url, body)] = serve.posts
    assert url == f"{SERVE_URL}/v1/infer"
    assert body == {
        "requests": [
            {
                "uri": CAT,
                "generation": GENERATION,
                "model": "mobilenet_v2",
                "request_id": f"triggerfish-images/cat.jpg#{GENERATION}",
                "entry_path": "upload",
            }
        ]
    }
    assert stored == []


def test_the_configured_default_model_is_used_for_uploads(
    apps: dict[str, FlaskClient], serve: FakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIGGERFISH_DEFAULT_MODEL", "text_detector")

    assert _upload(apps, _load("gcs_notification_push.json")) == 200

    assert [r["model"] for r in serve.forwarded] == ["text_detector"]


@pytest.mark.parametrize("event", ["OBJECT_DELETE", "OBJECT_METADATA_UPDATE"])
def test_a_notification_other_than_finalize_is_acknowledged_and_dropped(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded], event: str
) -> None:
    assert _upload(apps, _notification(eventType=event)) == 200

    assert serve.posts == [] and stored == []


def test_an_upload_to_a_disallowed_bucket_is_recorded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _upload(apps, _notification(bucketId="someone-elses")) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.BUCKET_NOT_ALLOWED
    assert record.result.entry_path is EntryPath.UPLOAD
    assert record.result.source.generation == GENERATION
    assert record.name == "mobilenet_v2/_/someone-elses/cat.jpg.json"


def test_a_notification_whose_payload_is_not_json_is_recorded_as_malformed(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    body = _load("gcs_notification_push.json")
    body["message"]["data"] = base64.b64encode(b"<xml/>").decode()

    assert _upload(apps, body) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.MALFORMED_MESSAGE
    assert record.result.entry_path is EntryPath.UPLOAD
    assert record.result.request_id == "17254689532971391"


def test_an_upload_fails_the_function_when_serve_is_unavailable(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    serve.status = 503

    assert _upload(apps, _load("gcs_notification_push.json")) == 500

    assert len(serve.posts) == 1 and stored == []


# --- on_upload: Eventarc CloudEvents ---------------------------------------------------


def test_an_eventarc_finalized_event_is_forwarded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    assert _eventarc(apps) == 200

    assert serve.forwarded == [
        {
            "uri": CAT,
            "generation": GENERATION,
            "model": "mobilenet_v2",
            "request_id": f"triggerfish-images/cat.jpg#{GENERATION}",
            "entry_path": "upload",
        }
    ]
    assert stored == []


def test_an_eventarc_event_without_a_name_is_recorded_as_malformed(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    data = {
        k: v for k, v in _load("eventarc_storage_finalized.json")["data"].items() if k != "name"
    }

    assert _eventarc(apps, data=data) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.MALFORMED_MESSAGE
    assert record.result.request_id == "8d3f2a1c-5b7e-4f10-9c2d-6e4b1a0f3e77"


def test_an_eventarc_event_fails_the_function_when_serve_is_unreachable(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded]
) -> None:
    serve.error = httpx.ConnectTimeout("timed out")

    assert _eventarc(apps) == 500

    assert stored == []


@pytest.mark.parametrize(
    "event_type", ["google.cloud.storage.object.v1.deleted", "com.example.something.else"]
)
def test_on_upload_ignores_an_unexpected_event_type(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: list[Recorded], event_type: str
) -> None:
    assert _eventarc(apps, **{"ce-type": event_type}) == 200

    assert serve.posts == [] and stored == []
