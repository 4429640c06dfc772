"""Every answer of the ingress's pipeline is counted once, with labels from what is served."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve import metrics
from serve.http.metered import MeteredPipeline
from serve.http.pipeline import Processed, ShedError
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.messages import EntryPath, InferenceRequest
from shared.results import InferenceResult, ModelRef, SourceRef, Status
from tests.fakes.metrics_recorder import Recorder


class _Pipeline:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers

    async def process_many(self, requests: Any, deadline: Any = None, settled: Any = None) -> list[Any]:
        return self.answers

    async def process_bytes(self, *args: Any) -> Any:
        answer = self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def recorder() -> Any:
    rec = Recorder()
    metrics.use_factory(rec)
    yield rec
    metrics.use_factory(metrics.RayMetricFactory())


def _ok(model: str = "mobilenet_v2") -> Processed:
    result = InferenceResult(
        source=SourceRef(uri="gs://b/a.jpg"), model=ModelRef(name=model, version="1"),
        status=Status.OK, request_id="r", entry_path=EntryPath.PUBSUB,
    )  # fmt: skip
    return Processed("r", result, "gs://results/a.json")


def _request(model: str | None = None) -> InferenceRequest:
    return InferenceRequest(
        uri="gs://b/a.jpg", model=model, request_id="r", entry_path=EntryPath.PUBSUB
    )


def test_each_input_of_a_call_is_counted_once(recorder: Any) -> None:
    wrapped = TransientError("ray wrapper")
    wrapped.cause = ShedError("queue full", 2.0)  # type: ignore[attr-defined]
    answers = [
        _ok(),
        TransientError("gcs 503"),
        wrapped,
        Processed("r", None, None, superseded=True),
    ]
    pipeline = MeteredPipeline(_Pipeline(answers), "mobilenet_v2", ["mobilenet_v2"])  # type: ignore[arg-type]

    got = asyncio.run(pipeline.process_many([_request()] * 4))

    assert got == answers
    requests = recorder.values["triggerfish_requests"]
    assert sum(requests.values()) == 4
    assert (
        recorder.get(
            "triggerfish_requests",
            model="mobilenet_v2",
            version="1",
            entry_path="pubsub",
            priority="live",
            status="ok",
        )
        == 1
    )
    assert (
        recorder.get(
            "triggerfish_requests",
            model="mobilenet_v2",
            version="*",
            entry_path="pubsub",
            priority="live",
            status="ok",
        )
        == 1
    )  # superseded
    assert recorder.get("triggerfish_errors", model="mobilenet_v2", reason="transient") == 1
    assert recorder.get("triggerfish_errors", model="mobilenet_v2", reason="overloaded") == 1


def test_a_model_nobody_serves_is_not_a_label_value(recorder: Any) -> None:
    failed = InferenceResult.failure(
        _request("x" * 60), ErrorReason.UNKNOWN_MODEL, "not served", model="x" * 60
    )
    pipeline = MeteredPipeline(
        _Pipeline([Processed("r", failed, "gs://r")]), "mobilenet_v2", ["mobilenet_v2"]
    )  # type: ignore[arg-type]

    asyncio.run(pipeline.process_many([_request("x" * 60)]))

    assert recorder.get("triggerfish_errors", model="*", reason="unknown_model") == 1


def test_a_raw_body_that_fails_is_counted_and_re_raised(recorder: Any) -> None:
    pipeline = MeteredPipeline(
        _Pipeline([PermanentError(ErrorReason.IMAGE_TOO_LARGE, "big")]),
        "mobilenet_v2",
        ["mobilenet_v2"],  # type: ignore[arg-type]
    )

    with pytest.raises(PermanentError):
        asyncio.run(pipeline.process_bytes(b"x", None, None, "r"))

    assert (
        recorder.get(
            "triggerfish_requests",
            model="mobilenet_v2",
            version="*",
            entry_path="http",
            priority="live",
            status="error",
        )
        == 1
    )
