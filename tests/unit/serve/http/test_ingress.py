"""The ingress: the request shapes ``POST /v1/infer`` accepts, deadlines, status codes, model handles."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from pydantic import ValidationError
from starlette.requests import Request

from serve.http.ingress import (
    DEFAULT_VERSION_TTL_S,
    MAX_REQUESTS_PER_CALL,
    HandleModelClient,
    Ingress,
    _deadline,
    parse_infer_body,
)
from serve.http.pipeline import Processed, ShedError
from serve.model.model_server import Rejection, Retry, VersionInfo
from serve.model_config import InputSpec, PreprocessSpec
from shared.auth import AuthError
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


def test_the_callers_deadline_header_is_used() -> None:
    wanted = time.time() + 12.5

    deadline = _deadline(_http_request(headers={DEADLINE_HEADER: f"{wanted:.3f}"}), 60)

    assert deadline == pytest.approx(wanted, abs=0.01)


@pytest.mark.parametrize(
    ("header", "offset"),
    [
        (lambda now: None, 60),
        (lambda now: "soon", 60),
        (lambda now: "", 60),
        (lambda now: str(now + 3600), 60),
        (lambda now: str(now - 5), 0),
    ],
    ids=["missing", "garbage", "empty", "beyond-the-default", "in-the-past"],
)
def test_a_missing_or_odd_deadline_is_bounded_by_now_and_the_default(
    header: Callable[[float], str | None], offset: float
) -> None:
    value = header(time.time())
    headers = {} if value is None else {DEADLINE_HEADER: value}

    deadline = _deadline(_http_request(headers=headers), 60)

    assert deadline == pytest.approx(time.time() + offset, abs=0.5)


# --- the model client over deployment handles -----------------------------------------


class _Method:
    def __init__(self, answer: Callable[..., Awaitable[Any]]) -> None:
        self.answer = answer
        self.calls: list[tuple] = []

    def remote(self, *args: Any) -> Awaitable[Any]:
        self.calls.append(args)
        return self.answer(*args)


class _Handle:
    """A deployment handle whose ``describe``/``infer_many`` answer as told."""

    def __init__(self, describe: Any = None, delay_s: float = 0.0) -> None:
        async def describe_answer(version: str | None) -> Any:
            return describe

        async def infer_answer(items: list, deadline: float | None) -> list:
            await asyncio.sleep(delay_s)
            return ["done"] * len(items)

        self.describe = _Method(describe_answer)
        self.infer_many = _Method(infer_answer)


INFO = VersionInfo("mobilenet_v2", "3", InputSpec(height=32, width=32), PreprocessSpec())


def test_describe_keeps_explicit_versions_and_asks_again_for_the_default_after_the_ttl() -> None:
    handle = _Handle(describe=INFO)
    now = [100.0]
    client = HandleModelClient({"mobilenet_v2": handle}, clock=lambda: now[0])  # type: ignore[dict-item]

    async def run() -> None:
        assert await client.describe("mobilenet_v2", None) == INFO
        assert await client.describe("mobilenet_v2", None) == INFO  # within the TTL
        assert await client.describe("mobilenet_v2", "3") == INFO  # learnt from the default
        now[0] += DEFAULT_VERSION_TTL_S + 0.1
        assert await client.describe("mobilenet_v2", None) == INFO

    asyncio.run(run())

    assert handle.describe.calls == [(None,), (None,)]
    assert client.models() == ["mobilenet_v2"]


def test_describe_turns_rejections_and_retries_into_errors() -> None:
    rejected = HandleModelClient(
        {"m": _Handle(describe=Rejection(ErrorReason.UNKNOWN_VERSION, "no 9"))}
    )  # type: ignore[dict-item]
    retried = HandleModelClient({"m": _Handle(describe=Retry("not loaded yet"))})  # type: ignore[dict-item]

    with pytest.raises(PermanentError) as info:
        asyncio.run(rejected.describe("m", "9"))
    with pytest.raises(TransientError, match="not loaded yet"):
        asyncio.run(retried.describe("m", None))

    assert (info.value.reason, info.value.message) == (ErrorReason.UNKNOWN_VERSION, "no 9")


def test_infer_many_passes_the_deadline_and_gives_up_when_it_passes() -> None:
    fast = _Handle()
    slow = _Handle(delay_s=5.0)
    deadline = time.time() + 30

    answers = asyncio.run(HandleModelClient({"m": fast}).infer_many("m", [1, 2], deadline))  # type: ignore[dict-item, list-item]

    assert answers == ["done", "done"]
    assert fast.infer_many.calls == [([1, 2], deadline)]
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        asyncio.run(HandleModelClient({"m": slow}).infer_many("m", [1], time.time() - 1))  # type: ignore[dict-item, list-item]
    assert time.monotonic() - started < 2.0


# --- the HTTP routes ------------------------------------------------------------------


class _Pipeline:
    """Records what the route hands to the pipeline and answers as told."""

    def __init__(self, answers: list[Any] | None = None) -> None:
        self.answers = answers
        self.many: list[tuple[list[InferenceRequest], float | None]] = []
        self.bytes: list[tuple] = []

    async def process_many(
        self, requests: list[InferenceRequest], deadline: float | None
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


def _ingress(pipeline: _Pipeline, verifier: Any = None, max_inflight: int = 1024) -> Any:
    # The class as written, below Serve's ASGI wrapper; built without Ray or a GcsClient.
    cls = next(c for c in Ingress.func_or_class.__mro__[1:] if c.__name__ == "Ingress")
    ingress = object.__new__(cls)
    ingress._settings = Settings(max_image_bytes=1000, request_timeout_s=60)
    ingress._pipeline = pipeline
    ingress._verifier = verifier
    ingress._max_inflight = max_inflight
    ingress._inflight = 0
    return ingress


def _post(
    ingress: Any, body: bytes, headers: dict[str, str], query: bytes = b""
) -> tuple[int, dict, Any]:
    response = asyncio.run(type(ingress).infer(ingress, _http_request(body, headers, query)))
    return response.status_code, response.headers, json.loads(response.body)


def test_infer_runs_the_requests_with_the_callers_deadline() -> None:
    pipeline = _Pipeline()
    wanted = time.time() + 20

    status, _, body = _post(
        _ingress(pipeline),
        json.dumps({"requests": [NORMALIZED]}).encode(),
        {"content-type": "application/json", DEADLINE_HEADER: str(wanted)},
    )

    assert status == 200
    assert body == {"results": [_processed(NORMALIZED["request_id"]).to_dict()]}
    [(requests, deadline)] = pipeline.many
    assert requests == [InferenceRequest(**NORMALIZED)]
    assert deadline == pytest.approx(wanted, abs=0.01)


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
    [(data, model, version, request_id, deadline)] = pipeline.bytes
    assert (data, model, version) == (b"\xff\xd8jpeg", "text_detector", "2")
    assert request_id.startswith("http-")
    assert deadline == pytest.approx(time.time() + 60, abs=1)


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

    status, headers, body = _post(ingress, json.dumps({"uris": [CAT] * 3}).encode(), {})
    image_status, _, _ = _post(
        _ingress(pipeline, max_inflight=0), b"\xff\xd8", {"content-type": "image/jpeg"}
    )

    assert (status, headers["retry-after"], body["error"]) == (429, "2", "overloaded")
    assert "limit 2" in body["message"]
    assert image_status == 429
    assert pipeline.many == [] and pipeline.bytes == []
    assert (
        _post(ingress, json.dumps({"uris": [CAT] * 2}).encode(), {})[0] == 200
    )  # within the bound


def test_inputs_in_flight_count_against_concurrent_calls_until_they_finish() -> None:
    gate = asyncio.Event()

    class Slow(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None
        ) -> list[Any]:
            await gate.wait()
            return await super().process_many(requests, deadline)

    ingress = _ingress(Slow(), max_inflight=3)
    body = json.dumps({"uris": [CAT] * 2}).encode()

    async def run() -> tuple[int, int, int, int]:
        first = asyncio.ensure_future(type(ingress).infer(ingress, _http_request(body, {})))
        await asyncio.sleep(0.01)
        during = ingress._inflight
        second = await type(ingress).infer(ingress, _http_request(body, {}))
        gate.set()
        return during, second.status_code, (await first).status_code, ingress._inflight

    during, second, first, after = asyncio.run(run())

    assert (during, second, first, after) == (2, 429, 200, 0)


def test_a_failing_call_releases_its_in_flight_inputs() -> None:
    class Broken(_Pipeline):
        async def process_many(
            self, requests: list[InferenceRequest], deadline: float | None
        ) -> list[Any]:
            raise RuntimeError("bug")

    ingress = _ingress(Broken(), max_inflight=3)

    with pytest.raises(RuntimeError):
        _post(ingress, json.dumps({"uris": [CAT] * 3}).encode(), {})

    assert ingress._inflight == 0


@pytest.mark.parametrize("authorization", [None, "Bearer forged"], ids=["no-token", "bad-token"])
def test_the_internal_form_needs_a_verified_caller(authorization: str | None) -> None:
    pipeline, verifier = _Pipeline(), _Verifier()
    headers = {} if authorization is None else {"authorization": authorization}

    status, _, body = _post(
        _ingress(pipeline, verifier), json.dumps({"requests": [NORMALIZED]}).encode(), headers
    )

    assert status == 403 and body["error"] == "unauthorized"
    assert verifier.seen == [authorization]
    assert pipeline.many == []


def test_a_verified_caller_may_send_the_internal_form() -> None:
    pipeline, verifier = _Pipeline(), _Verifier()

    status, _, _ = _post(
        _ingress(pipeline, verifier),
        json.dumps({"requests": [NORMALIZED]}).encode(),
        {"authorization": "Bearer good"},
    )

    assert status == 200 and verifier.seen == ["Bearer good"]
    assert [r.request_id for r in pipeline.many[0][0]] == [NORMALIZED["request_id"]]


def test_the_client_form_needs_no_token() -> None:
    pipeline, verifier = _Pipeline(), _Verifier()

    status, _, _ = _post(_ingress(pipeline, verifier), json.dumps({"uri": CAT}).encode(), {})

    assert status == 200 and verifier.seen == []


def test_the_decoder_is_pillow_unless_a_gpu_decoder_is_asked_for_and_present(monkeypatch) -> None:  # noqa: ANN001
    from serve.http.ingress import _decoder
    from serve.imaging.cpu_decode import prepare_image
    from shared.errors import ConfigError

    monkeypatch.setenv("TRIGGERFISH_DECODE", "cpu")
    monkeypatch.setenv("TRIGGERFISH_DECODE_THREADS", "3")
    assert _decoder() == (prepare_image, 3)
    monkeypatch.setenv("TRIGGERFISH_DECODE", "gpu")  # no CUDA here: falls back to the CPU
    monkeypatch.setattr("serve.imaging.gpu_decode.gpu_decode_available", lambda: False)
    assert _decoder() == (prepare_image, 3)
    monkeypatch.setenv("TRIGGERFISH_DECODE", "tpu")
    with pytest.raises(ConfigError, match="TRIGGERFISH_DECODE"):
        _decoder()
