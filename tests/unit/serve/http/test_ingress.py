"""The ingress: the request shapes ``POST /v1/infer`` accepts, deadlines, status codes, model handles."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from serve.http.admission import AdmissionGate, Cost
from serve.http.deadline import ANSWER_MARGIN_S
from serve.http.ingress import MAX_REQUESTS_PER_CALL, URI_INPUT_BYTES, Ingress, parse_infer_body
from serve.http.model_client import ModelStarting
from serve.http.pipeline import Processed, ShedError
from shared.auth import AuthError, AuthUnavailable
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.messages import DEADLINE_HEADER, EntryPath, InferenceRequest

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


def test_client_uris_become_indexed_http_requests_in_the_public_namespace() -> None:
    requests = parse_infer_body({"uris": [CAT, CAT], "request_id": "batch-1"})

    assert [r.request_id for r in requests] == ["http:batch-1/0", "http:batch-1/1"]
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


# --- deadlines --------------------------------------------------------------------------


def _http_request(
    body: bytes = b"", headers: dict[str, str] | None = None, query: bytes = b""
) -> Request:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/infer",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "query_string": query,
    }
    return Request(scope, receive)


# --- the HTTP routes ------------------------------------------------------------------


class _Pipeline:
    """Records what the route hands to the pipeline and answers as told."""

    def __init__(self, answers: list[Any] | None = None) -> None:
        self.answers = answers
        self.many: list[tuple[list[InferenceRequest], float | None]] = []
        self.bytes: list[tuple] = []

    async def process_many(
        self, requests: list[InferenceRequest], deadline: float | None, settled: Any = None
    ) -> list[Any]:
        self.many.append((list(requests), deadline))
        return (
            self.answers
            if self.answers is not None
            else [_processed(r.request_id) for r in requests]
        )

    async def process_bytes(self, *args: Any) -> Any:
        self.bytes.append(args)
        answer = (self.answers or [_processed("http")])[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _processed(request_id: str) -> Processed:
    return Processed(request_id, None, f"gs://r/{request_id}.json", superseded=True)


class _Client:
    def models(self) -> list[str]:
        return ["mobilenet_v2", "text_detector"]


def _ingress(
    pipeline: _Pipeline,
    verifier: Any = None,
    max_inflight: int = 1024,
    max_bytes: int = 1 << 30,
    wait_s: float = 0.0,
) -> Any:
    # The class as written, below Serve's ASGI wrapper; built without Ray or a GcsClient.
    cls = next(c for c in Ingress.func_or_class.__mro__[1:] if c.__name__ == "Ingress")
    ingress = object.__new__(cls)
    ingress._settings = Settings(max_image_bytes=1000, request_timeout_s=60)
    ingress._pipeline = pipeline
    ingress._verifier = verifier
    ingress._client = _Client()
    ingress._gate = AdmissionGate(max_inflight, max_bytes, max_wait_s=wait_s)
    return ingress


def _post(
    ingress: Any, body: bytes, headers: dict[str, str], query: bytes = b""
) -> tuple[int, dict, Any]:
    response = asyncio.run(type(ingress).infer(ingress, _http_request(body, headers, query)))
    return response.status_code, response.headers, json.loads(response.body)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b"[" * 10_000 + b"]" * 10_000, b'{"requests": "x"}', b"\xff"],
    ids=["not-json", "deeply-nested", "bad-shape", "not-utf8"],
)
def test_a_body_that_is_not_a_request_is_a_400_bad_request(body: bytes) -> None:
    pipeline = _Pipeline()

    status, _, answer = _post(_ingress(pipeline), body, {"content-type": "application/json"})

    assert status == 400 and answer["error"] == "bad_request"
    assert pipeline.many == []


def test_shedding_is_a_429_with_the_longest_retry_after() -> None:
    wrapped = TransientError("ray wrapper")
    wrapped.cause = ShedError("queue full", 7.4)  # type: ignore[attr-defined]
    pipeline = _Pipeline([_processed("a"), ShedError("queue full", 2.0), wrapped])

    status, headers, body = _post(_ingress(pipeline), json.dumps({"uris": [CAT] * 3}).encode(), {})

    assert status == 429 and headers["retry-after"] == "7"
    assert body["error"] == "overloaded"
    assert [r["status"] for r in body["results"]] == ["superseded", "retry", "retry"]


def test_any_other_transient_failure_is_a_503() -> None:
    pipeline = _Pipeline(
        [ShedError("queue full", 30.0), TransientError("Cloud Storage answered 503")]
    )

    status, headers, body = _post(_ingress(pipeline), json.dumps({"uris": [CAT] * 2}).encode(), {})

    assert status == 503 and headers["retry-after"] == "5"
    assert body["error"] == "transient" and body["message"] == "queue full"


def _timings(headers: Any) -> dict[str, float]:
    """``Server-Timing: store;dur=1.0, admission;dur=0.1`` as milliseconds by name."""
    parts = (entry.strip().split(";dur=") for entry in headers["server-timing"].split(","))
    return {name: float(ms) for name, ms in parts}


def test_every_answer_past_admission_says_where_its_time_went() -> None:
    stored = Processed("a", None, "gs://r/a.json", superseded=True, store_ms=12.5)
    slower = Processed("b", None, "gs://r/b.json", superseded=True, store_ms=40.4)

    _, ok, _ = _post(_ingress(_Pipeline([stored, slower])), json.dumps({"uris": [CAT] * 2}).encode(), {})
    status, shed, _ = _post(
        _ingress(_Pipeline([stored, ShedError("queue full", 2.0)])), json.dumps({"uris": [CAT] * 2}).encode(), {}
    )  # fmt: skip

    assert set(_timings(ok)) == {"store", "admission", "work"}
    assert _timings(ok)["store"] == 40.4  # the call's longest result write
    # A 429 whose other inputs were stored still says how long storing them took.
    assert status == 429 and _timings(shed)["store"] == 12.5 and "work" in _timings(shed)


def test_an_unrecorded_permanent_error_is_reported_in_a_200() -> None:
    pipeline = _Pipeline([PermanentError(ErrorReason.NOT_AN_IMAGE, "no pixels")])

    status, _, body = _post(_ingress(pipeline), json.dumps({"uri": CAT}).encode(), {})

    assert status == 200
    assert body["results"] == [
        {"status": "error", "error": {"reason": "not_an_image", "message": "no pixels"}}
    ]


def test_an_image_body_goes_to_process_bytes_with_model_version_and_deadline() -> None:
    pipeline = _Pipeline()

    status, _, _ = _post(
        _ingress(pipeline),
        b"\xff\xd8jpeg",
        {"content-type": "image/jpeg"},
        b"model=text_detector&version=2",
    )

    assert status == 200
    [(data, model, version, request_id, deadline, priority)] = pipeline.bytes
    assert (data, model, version, priority) == (b"\xff\xd8jpeg", "text_detector", "2", "live")
    assert request_id.startswith("http-")
    assert deadline == pytest.approx(time.time() + 60 - ANSWER_MARGIN_S, abs=1)


@pytest.mark.parametrize(
    ("query", "words"),
    [(b"model=resnet_9000", "unknown model 'resnet_9000'"), (b"version=../x", "version '../x'")],
    ids=["unknown-model", "bad-version"],
)
def test_a_bad_model_or_version_on_the_raw_route_is_a_400_naming_it(query: bytes, words: str) -> None:
    pipeline = _Pipeline()

    status, _, body = _post(_ingress(pipeline), b"\xff\xd8", {"content-type": "image/jpeg"}, query)

    assert (status, body["error"]) == (400, "bad_request") and words in body["message"]
    assert pipeline.bytes == []


@pytest.mark.parametrize(
    ("body", "headers", "status"),
    [
        (b"x" * 1001, {"content-type": "image/png", "content-length": "1001"}, 413),
        (b"x" * 1001, {"content-type": "application/octet-stream"}, 413),
        (b"", {"content-type": "image/png"}, 400),
    ],
    ids=["declared-too-large", "streamed-too-large", "empty"],
)
def test_an_image_body_over_the_limit_or_empty_is_refused(
    body: bytes, headers: dict, status: int
) -> None:
    pipeline = _Pipeline()

    answer_status, _, answer = _post(_ingress(pipeline), body, headers)

    assert answer_status == status
    assert answer["error"] == ("image_too_large" if status == 413 else "bad_request")
    assert pipeline.bytes == []


def test_a_transient_failure_of_an_image_body_is_a_503() -> None:
    pipeline = _Pipeline([TransientError("replica died")])

    status, _, body = _post(_ingress(pipeline), b"\xff\xd8", {"content-type": "image/jpeg"})

    assert status == 503 and body["message"] == "replica died"


# --- admission and authentication -------------------------------------------------------


class _Verifier:
    """Accepts one token, refuses anything else."""

    def __init__(self) -> None:
        self.seen: list[str | None] = []

    def caller(self, authorization: str | None) -> str:
        self.seen.append(authorization)
        if authorization != "Bearer good":
            raise AuthError("no bearer token" if authorization is None else "invalid token")
        return "functions@project.iam.gserviceaccount.com"


def test_a_call_beyond_the_in_flight_bound_is_shed_before_any_work() -> None:
    pipeline = _Pipeline()
    ingress = _ingress(pipeline, max_inflight=2)
    busy = asyncio.run(_hold(ingress, 1))

    status, headers, body = _post(busy, json.dumps({"uris": [CAT] * 2}).encode(), {})

    assert (status, headers["retry-after"], body["error"]) == (429, "2", "overloaded")
    assert "limit 2 inputs" in body["message"]
    assert pipeline.many == [] and pipeline.bytes == []
    assert _post(_ingress(pipeline, max_inflight=2), json.dumps({"uris": [CAT] * 2}).encode(), {})[0] == 200


def test_a_bulk_call_is_shed_where_a_live_call_still_gets_in() -> None:
    pipeline = _Pipeline()
    ingress = _ingress(pipeline, max_inflight=8)  # bulk may hold 6 of 8 (live headroom 25 %)
    busy = asyncio.run(_hold(ingress, 5))
    bulk = {"uris": [CAT] * 2, "priority": "bulk"}

    status, _, body = _post(busy, json.dumps(bulk).encode(), {})
    assert (status, body["error"]) == (429, "overloaded") and "(bulk)" in body["message"]
    assert _post(busy, json.dumps({"uris": [CAT] * 2}).encode(), {})[0] == 200
    classes = busy._gate.snapshot()["classes"]
    assert (classes["bulk"]["shed_inputs"], classes["live"]["admitted_inputs"]) == (2, 7)


def test_an_image_body_may_ask_to_be_bulk_and_a_bad_class_is_a_400() -> None:
    pipeline = _Pipeline()

    status, _, _ = _post(_ingress(pipeline), b"\xff\xd8jpeg", {"content-type": "image/jpeg"}, b"priority=bulk")
    bad, _, answer = _post(_ingress(pipeline), b"\xff\xd8jpeg", {"content-type": "image/jpeg"}, b"priority=urgent")

    assert status == 200 and pipeline.bytes[0][-1] == "bulk"
    assert (bad, answer["error"]) == (400, "bad_request") and "'urgent'" in answer["message"]


async def _hold(ingress: Any, inputs: int, size: int = 0) -> Any:
    """``ingress`` with ``inputs`` inputs (and ``size`` bytes) held by a call that never ends."""
    from serve.http.admission import Cost

    await ingress._gate.admit(Cost(inputs, size))
    return ingress


def test_a_raw_image_is_admitted_by_its_declared_bytes_before_it_is_read() -> None:
    pipeline = _Pipeline()
    ingress = _ingress(pipeline, max_bytes=500)
    busy = asyncio.run(_hold(ingress, 1, 400))
    read = []

    async def receive() -> dict:
        read.append(True)
        return {"type": "http.request", "body": b"\xff" * 200, "more_body": False}

    request = _http_request(b"", {"content-type": "image/jpeg", "content-length": "200"})
    request._receive = receive
    response = asyncio.run(type(busy).infer(busy, request))

    assert response.status_code == 429
    assert read == [] and pipeline.bytes == []  # shed before a byte of the body was read


def test_inputs_in_flight_count_against_concurrent_calls_until_they_finish() -> None:
    gate = asyncio.Event()

    class Slow(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None, settled: Any = None
        ) -> list[Any]:
            await gate.wait()
            return await super().process_many(requests, deadline)

    ingress = _ingress(Slow(), max_inflight=3)
    body = json.dumps({"uris": [CAT] * 2}).encode()

    async def run() -> tuple[int, int, int, int]:
        first = asyncio.ensure_future(type(ingress).infer(ingress, _http_request(body, {})))
        await asyncio.sleep(0.01)
        during = ingress._gate.held.inputs
        second = await type(ingress).infer(ingress, _http_request(body, {}))
        gate.set()
        return during, second.status_code, (await first).status_code, ingress._gate.held.inputs

    during, second, first, after = asyncio.run(run())

    assert (during, second, first, after) == (2, 429, 200, 0)


def test_a_large_call_is_passed_by_small_calls_only_until_its_turn_comes_due() -> None:
    """A 100-input call is not starved by one-input calls that would each fit."""
    hold = asyncio.Event()
    order: list[int] = []

    class Slow(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None, settled: Any = None
        ) -> list[Any]:
            order.append(len(requests))
            if len(order) == 1:
                await hold.wait()  # the first call holds 1 of 100 inputs
            return await super().process_many(requests, deadline)

    ingress = _ingress(Slow(), max_inflight=100, wait_s=30)

    def call(n: int) -> Any:
        return type(ingress).infer(ingress, _http_request(json.dumps({"uris": [CAT] * n}).encode(), {}))

    async def run() -> tuple[int, list[int]]:
        first = asyncio.ensure_future(call(1))
        await asyncio.sleep(0.01)
        big = asyncio.ensure_future(call(100))  # does not fit while the first runs: waits
        await asyncio.sleep(0.01)
        passed = 0
        while True:  # one-input calls, one after another, each fitting below the bound
            small = asyncio.ensure_future(call(1))
            await asyncio.sleep(0.005)
            if not small.done():
                break  # queued behind the large call
            passed += 1
            assert passed < 1000, "the large call's turn never came"
        hold.set()
        statuses = [(await t).status_code for t in [first, big, small]]
        assert statuses == [200] * 3
        return passed, order

    passed, order = asyncio.run(run())
    assert passed > 0  # small calls went ahead while the large one was not due ...
    assert order[-2:] == [100, 1]  # ... and the one that came once it was due ran after it


def test_a_failing_call_releases_its_in_flight_inputs() -> None:
    class Broken(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None, settled: Any = None
        ) -> list[Any]:
            raise RuntimeError("bug")

    ingress = _ingress(Broken(), max_inflight=3)

    with pytest.raises(RuntimeError):
        _post(ingress, json.dumps({"uris": [CAT] * 3}).encode(), {})

    assert ingress._gate.held.inputs == 0 and ingress._gate.held.bytes == 0


# --- deadlines ------------------------------------------------------------------------------


def test_infer_runs_the_requests_with_the_work_deadline_below_the_callers() -> None:
    pipeline = _Pipeline()
    wanted = time.time() + 20

    status, _, _ = _post(
        _ingress(pipeline),
        json.dumps({"requests": [NORMALIZED]}).encode(),
        {"content-type": "application/json", DEADLINE_HEADER: f"{wanted:.3f}"},
    )

    assert status == 200
    [(_, deadline)] = pipeline.many
    assert deadline == pytest.approx(wanted - ANSWER_MARGIN_S, abs=0.01)


@pytest.mark.parametrize(
    "header",
    ["nan", "NaN", "inf", "-inf", "-5", "0", "1e12", "1_795_000_000", "soon", "", "9" * 400, "0x10"],
)
def test_a_hostile_deadline_header_is_a_400_naming_the_value_before_any_work(header: str) -> None:
    pipeline = _Pipeline()

    status, _, body = _post(
        _ingress(pipeline), json.dumps({"uri": CAT}).encode(), {DEADLINE_HEADER: header}
    )

    assert status == 400 and body["error"] == "bad_deadline"
    assert DEADLINE_HEADER in body["message"] and repr(header[:64]) in body["message"]
    assert pipeline.many == []


def test_a_deadline_far_ahead_is_refused_and_one_in_the_past_is_a_retryable_503() -> None:
    pipeline = _Pipeline()
    ingress = _ingress(pipeline)

    far, _, far_body = _post(ingress, json.dumps({"uri": CAT}).encode(), {DEADLINE_HEADER: str(time.time() * 1000)})
    past, headers, past_body = _post(
        ingress, json.dumps({"uri": CAT}).encode(), {DEADLINE_HEADER: f"{time.time() - 5:.3f}"}
    )

    assert far == 400 and "milliseconds" in far_body["message"]
    assert (past, past_body["error"]) == (503, "deadline_passed") and headers["retry-after"] == "1"
    assert pipeline.many == []


def test_a_call_that_outlives_its_deadline_is_answered_503_before_the_caller_gives_up() -> None:
    class Stuck(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None, settled: Any = None
        ) -> list[Any]:
            await asyncio.sleep(60)
            return []

    ingress = _ingress(Stuck())
    caller = time.time() + ANSWER_MARGIN_S + 0.2

    status, headers, body = _post(
        ingress, json.dumps({"uri": CAT}).encode(), {DEADLINE_HEADER: f"{caller:.3f}"}
    )

    # Answered by the work deadline plus the handle's grace: while the caller still reads.
    assert status == 503 and headers["retry-after"] == "5"
    assert ingress._gate.held.inputs == 0


# --- authentication -------------------------------------------------------------------------


class _Verifier:
    """Accepts ``good`` (an invoker) everywhere and ``user`` (a caller) on the public routes."""

    def __init__(self, unavailable: bool = False) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self.unavailable = unavailable

    def caller(self, authorization: str | None) -> str:
        self.seen.append(("internal", authorization))
        return self._check(authorization, {"Bearer good"})

    def public_caller(self, authorization: str | None) -> str:
        self.seen.append(("public", authorization))
        return self._check(authorization, {"Bearer good", "Bearer user"})

    def _check(self, authorization: str | None, allowed: set[str]) -> str:
        if self.unavailable:
            raise AuthUnavailable("cannot fetch Google's certificates: non-JSON")
        if authorization not in allowed:
            raise AuthError("no bearer token" if authorization is None else "invalid token")
        return "someone@project.iam.gserviceaccount.com"


@pytest.mark.parametrize("authorization", [None, "Bearer forged", "Bearer user"], ids=["no-token", "bad-token", "not-an-invoker"])
def test_the_internal_form_needs_a_verified_invoker(authorization: str | None) -> None:
    pipeline, verifier = _Pipeline(), _Verifier()
    headers = {} if authorization is None else {"authorization": authorization}

    status, _, body = _post(
        _ingress(pipeline, verifier), json.dumps({"requests": [NORMALIZED]}).encode(), headers
    )

    assert status == 403 and body["error"] == "unauthorized"
    assert pipeline.many == []


def test_a_verified_invoker_may_send_the_internal_form() -> None:
    pipeline, verifier = _Pipeline(), _Verifier()

    status, _, _ = _post(
        _ingress(pipeline, verifier),
        json.dumps({"requests": [NORMALIZED]}).encode(),
        {"authorization": "Bearer good"},
    )

    assert status == 200 and verifier.seen == [("public", "Bearer good"), ("internal", "Bearer good")]
    assert [r.request_id for r in pipeline.many[0][0]] == [NORMALIZED["request_id"]]


def test_the_client_forms_need_a_token_of_an_allowed_caller() -> None:
    pipeline, verifier = _Pipeline(), _Verifier()
    ingress = _ingress(pipeline, verifier)

    anonymous = _post(ingress, json.dumps({"uri": CAT}).encode(), {})[0]
    raw = _post(ingress, b"\xff\xd8", {"content-type": "image/jpeg"})[0]
    allowed = _post(ingress, json.dumps({"uri": CAT}).encode(), {"authorization": "Bearer user"})[0]

    assert (anonymous, raw, allowed) == (403, 403, 200)
    assert pipeline.bytes == [] and len(pipeline.many) == 1


def test_a_failure_of_auth_infrastructure_is_a_503_never_a_400() -> None:
    pipeline = _Pipeline()

    status, headers, body = _post(
        _ingress(pipeline, _Verifier(unavailable=True)),
        json.dumps({"requests": [NORMALIZED]}).encode(),
        {"authorization": "Bearer good"},
    )

    assert (status, body["error"]) == (503, "auth_unavailable") and headers["retry-after"] == "5"
    assert pipeline.many == []


def test_only_health_routes_are_open_without_a_token() -> None:
    ingress = _ingress(_Pipeline(), _Verifier())
    cls = type(ingress)

    stats = asyncio.run(cls.stats(ingress, _http_request()))
    models = asyncio.run(cls.models(ingress, _http_request()))
    metadata = asyncio.run(cls.oip_server_metadata(ingress, _http_request()))

    assert (stats.status_code, models.status_code, metadata.status_code) == (403, 403, 403)
    ingress._oip = __import__("serve.http.oip_service", fromlist=["OipService"]).OipService(
        Settings(), None, None  # type: ignore[arg-type]
    )
    assert asyncio.run(cls.oip_live(ingress)).status_code == 200


def test_a_starting_model_is_a_503_with_its_retry_after() -> None:
    pipeline = _Pipeline([ModelStarting("model mobilenet_v2: no replica ready yet", 30)])

    status, headers, body = _post(_ingress(pipeline), json.dumps({"uri": CAT}).encode(), {})

    assert status == 503 and headers["retry-after"] == "30"
    assert body["results"][0]["status"] == "retry"


def test_an_ingress_that_requires_auth_without_an_audience_refuses_to_start(monkeypatch) -> None:  # noqa: ANN001
    from shared.errors import ConfigError

    cls = next(c for c in Ingress.func_or_class.__mro__[1:] if c.__name__ == "Ingress")
    monkeypatch.setattr("serve.http.ingress.configure_json_logging", lambda: None)
    monkeypatch.delenv("TRIGGERFISH_SERVE_AUDIENCE", raising=False)
    monkeypatch.delenv("TRIGGERFISH_AUTH", raising=False)

    with pytest.raises(ConfigError, match="TRIGGERFISH_SERVE_AUDIENCE is unset"):
        cls.__init__(object.__new__(cls), {})
    monkeypatch.setenv("TRIGGERFISH_AUTH", "sometimes")
    with pytest.raises(ConfigError, match="TRIGGERFISH_AUTH must be 'required' or 'off', got 'sometimes'"):
        cls.__init__(object.__new__(cls), {})


@pytest.mark.parametrize(("priority", "held_after"), [("live", 2), ("bulk", 3)])
def test_a_live_call_gives_its_hold_back_input_by_input_and_a_bulk_call_at_its_end(
    priority: str, held_after: int
) -> None:
    proceed = asyncio.Event()
    held: list[tuple[int, int]] = []

    class Settling(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None, settled: Any = None
        ) -> list[Any]:
            held.append((ingress._gate.held.inputs, ingress._gate.held.bytes))
            if settled is not None:
                settled(0)
                settled(0)  # twice for one input gives back one input's hold
            held.append((ingress._gate.held.inputs, ingress._gate.held.bytes))
            await proceed.wait()
            return await super().process_many(requests, deadline)

    ingress = _ingress(Settling())

    async def run() -> int:
        body = json.dumps({"uris": [CAT] * 3, "priority": priority}).encode()
        call = asyncio.ensure_future(type(ingress).infer(ingress, _http_request(body, {})))
        while len(held) < 2:
            await asyncio.sleep(0.001)
        proceed.set()
        return (await call).status_code

    assert asyncio.run(run()) == 200
    (inputs, bytes_), (inputs_after, bytes_after) = held
    assert (inputs, inputs_after) == (3, held_after)
    assert bytes_ - bytes_after == (3 - held_after) * URI_INPUT_BYTES
    assert ingress._gate.held == Cost(0, 0)
