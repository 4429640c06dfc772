"""The metrics facade: names, labels and values recorded, and that recording never raises."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from serve import metrics
from shared.errors import ErrorReason
from shared.messages import EntryPath, InferenceRequest
from shared.results import InferenceResult, ModelRef, SourceRef, Status, Timings
from tests.fakes.metrics_recorder import Recorder


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    rec = Recorder()
    metrics.use_factory(rec)
    yield rec
    metrics.use_factory(metrics.RayMetricFactory())


def _request(entry_path: EntryPath = EntryPath.PUBSUB) -> InferenceRequest:
    return InferenceRequest(uri="gs://b/cat.jpg", request_id="r-1", entry_path=entry_path)


def test_instruments_carry_the_names_the_alerts_and_dashboard_use(recorder: Recorder) -> None:
    metrics.record_answer("m", "1", "http", 0.1)

    assert recorder.declared == {
        "triggerfish_requests": ("counter", ("model", "version", "entry_path", "priority", "status")),
        "triggerfish_request_duration_seconds": ("histogram", ("model", "version", "entry_path", "priority")),
        "triggerfish_errors": ("counter", ("model", "reason")),
        "triggerfish_inference_count": ("counter", ("model", "version")),
        "triggerfish_execution_count": ("counter", ("model", "version")),
        "triggerfish_batch_size": ("histogram", ("model", "version")),
        "triggerfish_queue_duration_seconds": ("histogram", ("model", "version")),
        "triggerfish_compute_duration_seconds": ("histogram", ("model", "version")),
        "triggerfish_fetch_duration_seconds": ("histogram", ("model",)),
        "triggerfish_decode_duration_seconds": ("histogram", ("model",)),
        "triggerfish_load_shed": ("counter", ("model", "where", "priority")),
        "triggerfish_model_loaded": ("gauge", ("model", "version", "backend")),
        "triggerfish_queue_depth": ("gauge", ("model",)),
    }


def test_an_ok_result_counts_once_with_its_stage_timings(recorder: Recorder) -> None:
    result = InferenceResult(
        source=SourceRef(uri="gs://b/cat.jpg"),
        model=ModelRef(name="mobilenet_v2", version="1"),
        status=Status.OK,
        timings=Timings(fetch_ms=12.0, decode_ms=3.0),
        request_id="r-1",
        entry_path=EntryPath.UPLOAD,
    )

    metrics.record_result(result, 0.25)

    ok = {"model": "mobilenet_v2", "version": "1", "entry_path": "upload", "priority": "live"}
    assert recorder.get("triggerfish_requests", **ok, status="ok") == 1
    assert recorder.get("triggerfish_request_duration_seconds", **ok) == [0.25]
    assert recorder.get("triggerfish_fetch_duration_seconds", model="mobilenet_v2") == [0.012]
    assert recorder.get("triggerfish_decode_duration_seconds", model="mobilenet_v2") == [0.003]
    assert recorder.values["triggerfish_errors"] == {}


def test_an_error_record_counts_as_an_error_with_its_reason(recorder: Recorder) -> None:
    result = InferenceResult.failure(
        _request(), ErrorReason.NOT_AN_IMAGE, "cannot decode", model="m"
    )

    metrics.record_result(result, 0.01)
    metrics.record_answer("m", None, "pubsub", 0.02, "transient")

    assert (
        recorder.get(
            "triggerfish_requests", model="m", version="*", entry_path="pubsub", priority="live", status="error"
        )
        == 2
    )
    assert recorder.get("triggerfish_errors", model="m", reason="not_an_image") == 1
    assert recorder.get("triggerfish_errors", model="m", reason="transient") == 1


def test_a_batch_counts_one_execution_and_its_images(recorder: Recorder) -> None:
    metrics.record_batch("m", "2", 3, 0.04, [0.001, 0.002, 0.003], queue_depth=5)
    metrics.record_batch("m", "2", 1, 0.01, [0.0], queue_depth=0)

    mv = {"model": "m", "version": "2"}
    assert recorder.get("triggerfish_execution_count", **mv) == 2
    assert recorder.get("triggerfish_inference_count", **mv) == 4
    assert recorder.get("triggerfish_batch_size", **mv) == [3, 1]
    assert recorder.get("triggerfish_compute_duration_seconds", **mv) == [0.04, 0.01]
    assert len(recorder.get("triggerfish_queue_duration_seconds", **mv)) == 4
    assert recorder.get("triggerfish_queue_depth", model="m") == 0


def test_loaded_versions_are_one_and_unloaded_ones_drop_to_zero(recorder: Recorder) -> None:
    metrics.record_loaded("m", {"1": "onnxruntime:CPUExecutionProvider"})
    metrics.record_loaded("m", {"2": "tensorrt:fp16:sm_89"})

    assert (
        recorder.get(
            "triggerfish_model_loaded",
            model="m",
            version="1",
            backend="onnxruntime:CPUExecutionProvider",
        )
        == 0
    )
    assert (
        recorder.get(
            "triggerfish_model_loaded", model="m", version="2", backend="tensorrt:fp16:sm_89"
        )
        == 1
    )


def test_shed_inputs_are_counted_by_where(recorder: Recorder) -> None:
    metrics.record_shed("*", "ingress", 3)
    metrics.record_shed("m", "model")
    metrics.record_shed("m", "model", 0)

    assert recorder.get("triggerfish_load_shed", model="*", where="ingress", priority="live") == 3
    assert recorder.get("triggerfish_load_shed", model="m", where="model", priority="live") == 1


def test_shed_and_answers_are_counted_by_traffic_class(recorder: Recorder) -> None:
    metrics.record_shed("m", "model", 2, priority="bulk")
    metrics.record_answer("m", "1", "pubsub", 0.5, priority="bulk")

    assert recorder.get("triggerfish_load_shed", model="m", where="model", priority="bulk") == 2
    assert recorder.get("triggerfish_load_shed", model="m", where="model", priority="live") is None
    answer = {"model": "m", "version": "1", "entry_path": "pubsub", "priority": "bulk"}
    assert recorder.get("triggerfish_requests", **answer, status="ok") == 1
    assert recorder.get("triggerfish_request_duration_seconds", **answer) == [0.5]


def test_a_failing_metrics_backend_never_fails_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("metrics agent gone")

    metrics.use_factory(Broken())  # type: ignore[arg-type]
    try:
        metrics.record_answer("m", "1", "http", 0.1)
        metrics.record_batch("m", "1", 2, 0.1, [0.0, 0.0], 0)
    finally:
        metrics.use_factory(metrics.RayMetricFactory())
    assert "recording a metric failed" in caplog.text


def test_kept_gauges_are_set_again_and_unloaded_versions_are_not(recorder: Recorder) -> None:
    metrics.record_loaded("m", {"1": "cpu"})
    metrics.record_loaded("m", {"2": "cpu"})
    metrics.record_batch("m", "2", 1, 0.01, [0.0], queue_depth=3)
    recorder.values["triggerfish_model_loaded"].clear()
    recorder.values["triggerfish_queue_depth"].clear()

    metrics.refresh_gauges()

    assert recorder.get("triggerfish_model_loaded", model="m", version="2", backend="cpu") == 1
    assert recorder.get("triggerfish_model_loaded", model="m", version="1", backend="cpu") is None
    assert recorder.get("triggerfish_queue_depth", model="m") == 3
