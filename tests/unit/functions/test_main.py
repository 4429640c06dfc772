"""The Cloud Functions, driven with recorded payloads through functions-framework's real app.

Serve is replaced by a recorder (``get_http_client`` returns a fake whose ``post()``
records the forwarded body and headers); Cloud Storage by an in-memory fake behind
``GcsClient.from_environment``, so error results go through the real conditional store.
"""

from __future__ import annotations

import base64
import copy
import json
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask.testing import FlaskClient
from functions_framework import create_app

import functions._forward as forward_module
from shared.errors import ErrorReason, TransientError
from shared.gcs_limits import RequestRefused
from shared.messages import DEADLINE_HEADER, EntryPath, InferenceRequest
from shared.result_store import STATUS_METADATA_KEY
from shared.results import InferenceResult, Status
from tests.fakes.fake_gcs import InMemoryGcs

ROOT = Path(__file__).resolve().parents[3]
DATA = ROOT / "tests" / "data"
SOURCE = ROOT / "functions" / "main.py"
SERVE_URL = "http://serve.test:8000"
REQUESTS_TOPIC_PATH = "/projects/triggerfish-local/topics/triggerfish-requests"
UPLOADS_TOPIC_PATH = "/projects/triggerfish-local/topics/triggerfish-uploads"
BULK_TOPIC_PATH = "/projects/triggerfish-local/topics/triggerfish-bulk"
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
    error_code: str = "transient"
    body: bytes | None = None
    #: Per-request results of a 200, instead of one ``ok`` per request.
    results: list[dict[str, Any]] | None = None
    #: Request ids Serve refuses (400 ``bad_request``), failing any call that carries one.
    refuses: frozenset[str] = frozenset()
    posts: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    timeouts: list[httpx.Timeout | None] = field(default_factory=list)

    def post(
        self,
        url: str,
        json: dict[str, Any],
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        self.posts.append((url, copy.deepcopy(json)))
        self.headers.append(dict(headers or {}))
        self.timeouts.append(timeout)
        request = httpx.Request("POST", url)
        if self.error is not None:
            raise self.error
        if self.refuses & {r["request_id"] for r in json["requests"]}:
            return httpx.Response(400, json={"error": "bad_request", "message": "x"}, request=request)
        if self.status == 200 and self.results is not None:
            return httpx.Response(200, json={"results": self.results}, request=request)
        if self.status == 200:
            results = [
                {"request_id": r["request_id"], "status": "ok", "result_uri": f"gs://r/{i}.json"}
                for i, r in enumerate(json["requests"])
            ]
            return httpx.Response(200, json={"results": results}, request=request)
        if self.body is not None:
            return httpx.Response(self.status, content=self.body, request=request)
        return httpx.Response(
            self.status, json={"error": self.error_code, "message": "x"}, request=request
        )

    @property
    def forwarded(self) -> list[dict[str, Any]]:
        """Every request forwarded, over all calls."""
        return [r for _, body in self.posts for r in body["requests"]]


@dataclass
class Recorded:
    """An error result the function wrote to the results bucket."""

    bucket: str
    name: str
    result: InferenceResult

    @property
    def reason(self) -> ErrorReason:
        assert self.result.status is Status.ERROR and self.result.error is not None
        return self.result.error.reason


class StoredResults(Sequence[Recorded]):
    """The results written so far, in order, read from the in-memory Cloud Storage on each use."""

    def __init__(self, gcs: InMemoryGcs) -> None:
        self.gcs = gcs

    def _records(self) -> list[Recorded]:
        return [
            Recorded(w.bucket, w.name, InferenceResult.model_validate_json(w.payload))
            for w in self.gcs.writes
            if w.succeeded
        ]

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        return self._records()[index]

    def __len__(self) -> int:
        return len(self._records())

    def __eq__(self, other: object) -> bool:
        return self._records() == other

    def __repr__(self) -> str:
        return repr(self._records())


@pytest.fixture(scope="module")
def apps() -> Iterator[dict[str, FlaskClient]]:
    path_before = list(sys.path)
    main_before = sys.modules.get("main")
    clients = {
        target: create_app(
            target=target, source=str(SOURCE), signature_type="cloudevent"
        ).test_client()
        for target in ("on_request", "on_upload", "on_bulk")
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


@pytest.fixture(autouse=True)
def gcs(monkeypatch: pytest.MonkeyPatch) -> InMemoryGcs:
    """Cloud Storage as the function's store sees it; no test reaches the real service."""
    fake = InMemoryGcs()

    class Client:
        @staticmethod
        def from_environment(timeout_s: float = 30.0) -> InMemoryGcs:
            return fake

    monkeypatch.setattr(forward_module, "GcsClient", Client)
    return fake


@pytest.fixture
def stored(gcs: InMemoryGcs) -> StoredResults:
    return StoredResults(gcs)


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
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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


def test_serve_is_told_when_the_function_stops_waiting(
    apps: dict[str, FlaskClient], serve: FakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIGGERFISH_REQUEST_TIMEOUT_S", "42")
    before = time.time()

    assert _request(apps, _load("pubsub_push_request.json")) == 200

    [headers] = serve.headers
    deadline = float(headers[DEADLINE_HEADER])
    assert before + 42 - 0.001 <= deadline <= time.time() + 42 + 0.001  # sent with ms precision


class _Tokens:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error

    def header(self) -> dict[str, str]:
        if self.error is not None:
            raise self.error
        return {"authorization": "Bearer id-token-for-serve"}


def test_an_id_token_is_sent_when_serve_authenticates_callers(
    apps: dict[str, FlaskClient], serve: FakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forward_module, "get_token_source", lambda: _Tokens())

    assert _request(apps, _load("pubsub_push_request.json")) == 200

    [headers] = serve.headers
    assert headers["authorization"] == "Bearer id-token-for-serve"
    assert DEADLINE_HEADER in headers


def test_no_token_is_sent_without_an_audience(
    apps: dict[str, FlaskClient], serve: FakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRIGGERFISH_SERVE_AUDIENCE", raising=False)
    forward_module.get_token_source.cache_clear()
    try:
        assert _request(apps, _load("pubsub_push_request.json")) == 200
    finally:
        forward_module.get_token_source.cache_clear()

    assert "authorization" not in serve.headers[0]


def test_a_token_that_cannot_be_minted_fails_the_function(
    apps: dict[str, FlaskClient],
    serve: FakeServe,
    stored: StoredResults,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = _Tokens(error=RuntimeError("metadata server unavailable"))
    monkeypatch.setattr(forward_module, "get_token_source", lambda: tokens)

    assert _request(apps, _load("pubsub_push_request.json")) == 500

    assert serve.posts == [] and stored == []


def test_without_request_id_the_pubsub_message_id_is_used(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults, data: bytes
) -> None:
    body = _push(data=base64.b64encode(data).decode())

    assert _request(apps, body) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.MALFORMED_MESSAGE
    assert record.bucket == "triggerfish-results"
    assert record.name.startswith("_invalid/")
    assert record.result.request_id == "17254689532971390"
    assert record.result.entry_path is EntryPath.PUBSUB
    assert "17254689532971390" in (record.result.error.message if record.result.error else "")


def test_message_data_that_is_not_base64_is_malformed(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _request(apps, _push(data="%%% not base64 %%%")) == 200

    assert serve.posts == []
    assert [r.reason for r in stored] == [ErrorReason.MALFORMED_MESSAGE]
    assert "not base64" in (stored[0].result.error.message if stored[0].result.error else "")


def test_an_invalid_uri_is_recorded_and_not_forwarded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _request(apps, _push({"uri": "https://example.com/cat.jpg", "request_id": "r-1"})) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.INVALID_URI
    assert record.name.startswith("_invalid/")
    assert record.result.source.uri == "https://example.com/cat.jpg"
    assert record.result.model.name == "mobilenet_v2"


def test_a_disallowed_bucket_is_recorded_and_not_forwarded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert (
        _request(apps, _push({"uri": "gs://someone-elses/cat.jpg", "model": "text_detector"}))
        == 200
    )

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.BUCKET_NOT_ALLOWED
    assert record.name == "text_detector/someone-elses/cat.jpg.json"


def test_valid_uris_are_forwarded_together_and_the_invalid_one_recorded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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


@pytest.mark.parametrize("status", [503, 500, 429, 408, 404, 502])
def test_serve_overloaded_fails_the_function_so_pubsub_redelivers(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults, status: int
) -> None:
    serve.status = status  # 404: a proxy answering while Serve redeploys its routes

    assert _request(apps, _load("pubsub_push_request.json")) == 500

    assert len(serve.posts) == 1
    assert stored == []


def test_serve_unreachable_fails_the_function_so_pubsub_redelivers(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    serve.error = httpx.ConnectError("connection refused")

    assert _request(apps, _load("pubsub_push_request.json")) == 500

    assert stored == []


@pytest.mark.parametrize(
    "answer",
    [
        {"error_code": "overloaded"},
        {"body": b"<html>Bad Request</html>"},
        {"body": b'["bad_request"]'},
    ],
    ids=["other-error-code", "not-json", "not-an-object"],
)
def test_a_400_that_is_not_serves_bad_request_is_transient(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults, answer: dict
) -> None:
    serve.status = 400
    for key, value in answer.items():
        setattr(serve, key, value)

    assert _request(apps, _load("pubsub_push_request.json")) == 500

    assert len(serve.posts) == 1
    assert stored == []


def test_serve_rejecting_the_request_records_errors_and_acknowledges(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    serve.status, serve.error_code = 400, "bad_request"

    assert (
        _request(apps, _push({"uris": [CAT, "gs://more-images/dog.jpg"], "request_id": "j"})) == 200
    )

    # Refused together, then each alone: only then is each one a malformed request.
    assert [[r["request_id"] for r in body["requests"]] for _, body in serve.posts] == [["j/0", "j/1"], ["j/0"], ["j/1"]]
    assert [r.reason for r in stored] == [ErrorReason.MALFORMED_MESSAGE] * 2
    assert [r.result.request_id for r in stored] == ["j/0", "j/1"]
    assert [r.name for r in stored] == [
        "mobilenet_v2/triggerfish-images/cat.jpg.json",
        "mobilenet_v2/more-images/dog.jpg.json",
    ]
    assert "Serve rejected the request (400)" in (
        stored[0].result.error.message if stored[0].result.error else ""
    )


def test_an_error_result_carries_its_rank_and_a_redelivery_replaces_it(
    apps: dict[str, FlaskClient], serve: FakeServe, gcs: InMemoryGcs, stored: StoredResults
) -> None:
    body = _push({"uri": "gs://someone-elses/cat.jpg", "request_id": "r-7"})

    assert _request(apps, body) == 200
    first = gcs.get("triggerfish-results", "mobilenet_v2/someone-elses/cat.jpg.json")
    assert first is not None and first.metadata[STATUS_METADATA_KEY] == "error"
    assert _request(apps, body) == 200  # redelivered: same name, equal rank

    assert [r.name for r in stored] == ["mobilenet_v2/someone-elses/cat.jpg.json"] * 2
    assert [(w.if_generation_match, w.succeeded) for w in gcs.writes] == [
        (0, True),
        (0, False),
        (first.generation, True),  # replaced only if nobody changed it in between
    ]
    assert gcs.closed == 2  # one short-lived client per recorded failure, always closed


def test_a_failure_that_cannot_be_recorded_fails_the_function(
    apps: dict[str, FlaskClient], serve: FakeServe, gcs: InMemoryGcs, stored: StoredResults
) -> None:
    gcs.write_error = TransientError("Cloud Storage answered 503 writing")

    assert _request(apps, _push({"uri": "https://example.com/cat.jpg"})) == 500

    assert serve.posts == [] and stored == []
    assert gcs.closed == 1


def test_on_request_ignores_an_unexpected_event_type(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _eventarc(apps, target="on_request") == 200

    assert serve.posts == [] and stored == []


# --- on_upload: GCS notifications through Pub/Sub --------------------------------------


def test_a_gcs_notification_is_forwarded_with_generation_and_default_model(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults, event: str
) -> None:
    assert _upload(apps, _notification(eventType=event)) == 200

    assert serve.posts == [] and stored == []


def test_an_upload_to_a_disallowed_bucket_is_recorded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _upload(apps, _notification(bucketId="someone-elses")) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.BUCKET_NOT_ALLOWED
    assert record.result.entry_path is EntryPath.UPLOAD
    assert record.result.source.generation == GENERATION
    assert record.name == "mobilenet_v2/someone-elses/cat.jpg.json"


def test_a_notification_whose_payload_is_not_json_is_recorded_as_malformed(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    serve.status = 503

    assert _upload(apps, _load("gcs_notification_push.json")) == 500

    assert len(serve.posts) == 1 and stored == []


# --- on_upload: Eventarc CloudEvents ---------------------------------------------------


def test_an_eventarc_finalized_event_is_forwarded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
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
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    serve.error = httpx.ConnectTimeout("timed out")

    assert _eventarc(apps) == 500

    assert stored == []


@pytest.mark.parametrize(
    "event_type", ["google.cloud.storage.object.v1.deleted", "com.example.something.else"]
)
def test_on_upload_ignores_an_unexpected_event_type(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults, event_type: str
) -> None:
    assert _eventarc(apps, **{"ce-type": event_type}) == 200

    assert serve.posts == [] and stored == []


def test_a_429_fails_only_the_inputs_serve_marks_for_retry(serve: FakeServe, stored: StoredResults) -> None:
    done = {"request_id": "job/0", "status": "ok", "result_uri": "gs://r/0.json"}
    retry = {"status": "retry", "error": {"message": "batch queue full"}}
    serve.status, serve.body = 429, json.dumps({"error": "overloaded", "results": [done, retry]}).encode()
    ok_request = InferenceRequest(uri="gs://triggerfish-images/a.jpg", request_id="job/0", entry_path=EntryPath.PUBSUB)
    shed = InferenceRequest(uri="gs://triggerfish-images/b.jpg", request_id="job/1", entry_path=EntryPath.PUBSUB)

    answers = forward_module._post([ok_request, shed], deadline=time.time() + 60)

    assert answers[0] == done
    assert isinstance(answers[1], TransientError) and "429" in str(answers[1])
    assert stored == []


# --- a 400 on a merged call, deadlines, answers Serve could not record ---------------------


def _requests(n: int, job: str = "m") -> list[InferenceRequest]:
    return [
        InferenceRequest(uri=f"gs://triggerfish-images/{k}.jpg", request_id=f"{job}/{k}", entry_path=EntryPath.PUBSUB)
        for k in range(n)
    ]


def test_a_400_on_a_merged_call_is_split_until_the_refused_request_stands_alone(
    serve: FakeServe, stored: StoredResults
) -> None:
    serve.refuses = frozenset({"m/5"})

    answers = forward_module._post(_requests(8), deadline=time.time() + 60)

    assert [a["request_id"] for a in answers if isinstance(a, dict)] == [f"m/{k}" for k in range(8) if k != 5]
    assert isinstance(answers[5], forward_module._Rejected)
    sent = [[int(r["request_id"][2:]) for r in body["requests"]] for _, body in serve.posts]
    assert sent == [[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7], [4, 5], [4], [5], [6, 7]]
    assert stored == []  # _post only answers; forward() records


def test_events_merged_with_a_refused_one_are_answered_and_only_it_is_recorded(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    serve.refuses = frozenset({"j/1"})

    assert _request(apps, _push({"uris": [CAT, "gs://more-images/dog.jpg", CAT + "2"], "request_id": "j"})) == 200

    [record] = stored
    assert record.reason is ErrorReason.MALFORMED_MESSAGE and record.result.request_id == "j/1"
    answered = [r["request_id"] for _, body in serve.posts for r in body["requests"] if len(body["requests"]) == 1]
    assert "j/1" in answered


def test_no_call_goes_out_after_the_deadline_and_each_is_bounded_by_it(serve: FakeServe) -> None:
    late = forward_module._post(_requests(2), deadline=time.time() - 1)
    assert all(isinstance(a, TransientError) and "deadline" in str(a) for a in late) and len(late) == 2
    assert serve.posts == []

    forward_module._post(_requests(2), deadline=time.time() + 7)

    [timeout] = serve.timeouts
    assert timeout is not None and timeout.read is not None and 0 < timeout.read <= 7


def test_an_error_outranked_by_a_stored_result_is_logged_with_request_id_and_uri(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults, capfd: pytest.CaptureFixture[str]
) -> None:
    serve.results = [{
        "request_id": "v-9", "status": "error", "superseded": True,
        "error": {"reason": "unknown_version", "message": "version 9 is not served"},
        "result_uri": "gs://triggerfish-results/mobilenet_v2/triggerfish-images/cat.jpg.json",
        "error_record_uri": "gs://triggerfish-results/_superseded/1/2.json",
    }]  # fmt: skip

    assert _request(apps, _push({"uri": CAT, "version": "9", "request_id": "v-9"})) == 200

    # The function's JSON log lines (what Cloud Logging reads from stderr).
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
    [warning] = [line for line in lines if "outranks the error" in line["message"]]
    assert warning["severity"] == "WARNING"
    assert warning["request_id"] == "v-9" and warning["uri"] == CAT and warning["reason"] == "unknown_version"
    assert warning["error_record_uri"] == "gs://triggerfish-results/_superseded/1/2.json"
    assert stored == []  # the kept result stays; nothing is written over it


def test_an_error_serve_could_not_record_gets_a_typed_record_by_request_id(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    serve.results = [{"status": "error", "error": {"reason": "invalid_uri", "message": "Cloud Storage refused"}}]

    assert _request(apps, _push({"uri": CAT, "request_id": "long-1"})) == 200

    [record] = stored
    assert record.reason is ErrorReason.INVALID_URI and record.result.request_id == "long-1"
    assert record.name.startswith("_invalid/")


def test_a_result_name_cloud_storage_refuses_is_recorded_under_the_request_id(
    apps: dict[str, FlaskClient], serve: FakeServe, gcs: InMemoryGcs, stored: StoredResults
) -> None:
    def refuse_source_names(bucket: str, name: str) -> None:
        if not name.startswith("_invalid/"):
            raise RequestRefused(f"Cloud Storage refused gs://{bucket}/{name} (400)")

    gcs.before_write = refuse_source_names

    assert _request(apps, _push({"uri": "gs://someone-elses/cat.jpg", "request_id": "r-8"})) == 200

    [record] = stored
    assert record.reason is ErrorReason.BUCKET_NOT_ALLOWED and record.result.request_id == "r-8"
    assert record.name.startswith("_invalid/")


def test_a_half_that_fails_in_a_split_call_does_not_take_the_other_halfs_answers(
    serve: FakeServe, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve.refuses = frozenset({"m/0"})
    post = serve.post

    def unreachable_for_the_second_half(url: str, json: dict[str, Any], **kwargs: Any) -> httpx.Response:
        if json["requests"][0]["request_id"] == "m/2":
            raise httpx.ConnectError("refused")
        return post(url, json, **kwargs)

    monkeypatch.setattr(serve, "post", unreachable_for_the_second_half)

    answers = forward_module._post(_requests(4), deadline=time.time() + 60)

    assert isinstance(answers[0], forward_module._Rejected) and answers[1]["request_id"] == "m/1"
    assert all(isinstance(a, TransientError) for a in answers[2:])


def test_a_200_whose_results_do_not_match_the_requests_is_transient(serve: FakeServe) -> None:
    serve.results = [{"request_id": "m/0", "status": "ok", "result_uri": "gs://r/0.json"}]

    with pytest.raises(TransientError, match="answered 2 requests"):
        forward_module._post(_requests(2), deadline=time.time() + 60)


# --- on_bulk --------------------------------------------------------------------------


def test_every_request_of_a_bulk_message_is_forwarded_as_bulk(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    message = {"uris": [CAT, CAT.replace("cat", "dog")], "request_id": "backfill-1", "priority": "live"}

    assert _post_push(apps, "on_bulk", _push(message), BULK_TOPIC_PATH) == 200

    [(_, body)] = serve.posts
    assert [(r["request_id"], r["priority"], r["model"]) for r in body["requests"]] == [
        ("backfill-1/0", "bulk", "mobilenet_v2"),
        ("backfill-1/1", "bulk", "mobilenet_v2"),
    ]  # the bulk topic's messages are bulk whatever they say


def test_a_replayed_storage_notification_on_the_bulk_topic_is_bulk_upload_work(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _post_push(apps, "on_bulk", _load("gcs_notification_push.json"), BULK_TOPIC_PATH) == 200

    [(_, body)] = serve.posts
    [request] = body["requests"]
    assert (request["uri"], request["generation"], request["entry_path"], request["priority"]) == (
        CAT, GENERATION, "upload", "bulk",
    )  # fmt: skip


def test_a_message_may_ask_to_be_bulk_on_the_requests_topic(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _request(apps, _push({"uri": CAT, "priority": "bulk"})) == 200

    [(_, body)] = serve.posts
    assert body["requests"][0]["priority"] == "bulk"


def test_a_malformed_bulk_message_is_recorded_and_acknowledged(
    apps: dict[str, FlaskClient], serve: FakeServe, stored: StoredResults
) -> None:
    assert _post_push(apps, "on_bulk", _push({"uri": CAT, "priority": "urgent"}), BULK_TOPIC_PATH) == 200

    assert serve.posts == []
    [record] = stored
    assert record.reason is ErrorReason.MALFORMED_MESSAGE
    assert "priority" in (record.result.error.message if record.result.error else "")
