"""The ingress pipeline over a fake model client and an in-memory Cloud Storage."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

import serve.http.pipeline as pipeline_module
from serve.http.pipeline import InferencePipeline, Processed, ShedError, unwrap
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import BatchItem, EncodedItem, ItemOutcome
from serve.model_config import InputSpec, PreprocessSpec, preparation_key
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.messages import EntryPath, InferenceRequest, Priority
from shared.result_store import GENERATION_METADATA_KEY, result_metadata
from shared.results import (
    InferenceResult,
    Label,
    ModelRef,
    SourceRef,
    Status,
    superseded_error_object_name,
)
from tests.fakes.fake_gcs import InMemoryGcs

CAT_BYTES = (Path(__file__).resolve().parents[4] / "infra" / "samples" / "cat.jpg").read_bytes()
IMAGES = "triggerfish-images"
RESULTS = "triggerfish-results"
CAT = f"gs://{IMAGES}/cat.jpg"
CAT_RESULT = "mobilenet_v2/triggerfish-images/cat.jpg.json"
GENERATION = 1795239515643133
SETTINGS = Settings(
    results_bucket=RESULTS,
    allowed_buckets=frozenset({IMAGES}),
    max_image_bytes=1_000_000,
)
TABBY = [
    Label(class_id=281, label="tabby", score=0.9),
    Label(class_id=282, label="tiger cat", score=0.05),
]

Answer = ItemOutcome | Rejection | Retry


class WrappedByRay(RuntimeError):
    """What Ray re-raises for a replica failure: the original is ``.cause``."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__("ray wrapper")
        self.cause = cause


def _tabby(item: BatchItem) -> Answer:
    return ItemOutcome(
        version=item.version,
        backend="onnxruntime:CPUExecutionProvider",
        labels=TABBY,
        queue_wait_ms=1.5,
        inference_ms=3.25,
        batch_size=2,
    )


@dataclass
class FakeModels:
    """A :class:`serve.http.pipeline.ModelClient` serving version 1 of two models."""

    answer: Callable[[BatchItem], Answer] = _tabby
    infer_error: BaseException | None = None
    describe_error: Exception | None = None
    calls: list[tuple[str, list[BatchItem], float | None]] = field(default_factory=list)
    described: list[tuple[str, str | None]] = field(default_factory=list)

    def models(self) -> list[str]:
        return ["mobilenet_v2", "text_detector"]

    async def describe(self, model: str, version: str | None) -> VersionInfo:
        self.described.append((model, version))
        if self.describe_error is not None:
            raise self.describe_error
        if version not in (None, "1"):
            raise PermanentError(ErrorReason.UNKNOWN_VERSION, f"no version {version!r}")
        return VersionInfo(model, "1", InputSpec(height=32, width=32), PreprocessSpec())

    async def infer_many(
        self, model: str, items: list[BatchItem], deadline: float | None
    ) -> list[Answer]:
        self.calls.append((model, list(items), deadline))
        await asyncio.sleep(0)
        if self.infer_error is not None:
            raise self.infer_error
        return [self.answer(item) for item in items]

    @property
    def items(self) -> list[tuple[str, BatchItem]]:
        return [(model, item) for model, items, _ in self.calls for item in items]


@pytest.fixture
def gcs() -> InMemoryGcs:
    fake = InMemoryGcs()
    fake.put(IMAGES, "cat.jpg", CAT_BYTES, generation=GENERATION)
    return fake


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def _request(uri: str = CAT, **fields: Any) -> InferenceRequest:
    return InferenceRequest(
        uri=uri, request_id=fields.pop("request_id", "m-1"), entry_path=EntryPath.PUBSUB, **fields
    )


def _pipeline(
    executor: ThreadPoolExecutor, gcs: InMemoryGcs, models: FakeModels | None = None
) -> InferencePipeline:
    return InferencePipeline(SETTINGS, models or FakeModels(), gcs, executor)  # type: ignore[arg-type]


def _many(
    executor: ThreadPoolExecutor,
    gcs: InMemoryGcs,
    requests: list[InferenceRequest],
    models: FakeModels | None = None,
    deadline: float | None = None,
) -> list[Processed | BaseException]:
    return asyncio.run(_pipeline(executor, gcs, models).process_many(requests, deadline))


def _process(
    executor: ThreadPoolExecutor,
    gcs: InMemoryGcs,
    request: InferenceRequest,
    models: FakeModels | None = None,
) -> Processed:
    [answer] = _many(executor, gcs, [request], models)
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _error(processed: Processed) -> ErrorReason:
    assert processed.result is not None
    assert processed.result.status is Status.ERROR
    assert processed.result.error is not None
    return processed.result.error.reason


def _stored(gcs: InMemoryGcs, name: str = CAT_RESULT) -> InferenceResult:
    obj = gcs.get(RESULTS, name)
    assert obj is not None, f"no result at {name}: {gcs.names(RESULTS)}"
    return InferenceResult.model_validate_json(obj.data)


def test_an_image_gets_an_ok_result_with_labels_and_timings(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()

    processed = _process(executor, gcs, _request(generation=str(GENERATION)), models)

    result = processed.result
    assert result is not None and result.status is Status.OK
    assert result.labels == TABBY
    assert result.backend == "onnxruntime:CPUExecutionProvider"
    assert (result.model.name, result.model.version) == ("mobilenet_v2", "1")
    assert (result.source.uri, result.source.generation) == (CAT, str(GENERATION))
    assert (result.request_id, result.entry_path) == ("m-1", EntryPath.PUBSUB)
    t = result.timings
    assert (t.queue_wait_ms, t.inference_ms, t.batch_size) == (1.5, 3.25, 2)
    assert t.fetch_ms is not None and t.fetch_ms >= 0
    assert t.decode_ms is not None and t.decode_ms > 0
    assert t.end_to_end_ms is not None and t.end_to_end_ms >= t.decode_ms
    # The image was fetched at the notified generation and preprocessed for the version.
    assert gcs.reads[0][1:] == (str(GENERATION), 1_000_000)
    [(model, item)] = models.items
    assert model == "mobilenet_v2" and item.version == "1"
    assert item.pixels.shape == (32, 32, 3)
    assert (item.geometry.original_height, item.geometry.original_width) == (300, 451)
    # Stored once, at the name without version, carrying its rank as metadata.
    assert gcs.names(RESULTS) == [CAT_RESULT]
    assert processed.result_uri == f"gs://{RESULTS}/{CAT_RESULT}"
    assert _stored(gcs) == result
    assert gcs.get(RESULTS, CAT_RESULT).metadata == result_metadata(result)  # type: ignore[union-attr]
    assert not processed.superseded


def test_the_generation_actually_read_is_recorded(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, gcs, _request())

    assert gcs.reads[0][1] is None  # no generation known: read the current one
    assert processed.result is not None
    assert processed.result.source.generation == str(GENERATION)
    assert gcs.get(RESULTS, CAT_RESULT).metadata[GENERATION_METADATA_KEY] == str(GENERATION)  # type: ignore[union-attr]


def test_the_requested_model_and_version_are_used(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()

    processed = _process(executor, gcs, _request(model="text_detector", version="1"), models)

    assert models.described == [("text_detector", "1")]
    assert [model for model, _, _ in models.calls] == ["text_detector"]
    assert processed.result is not None and processed.result.model.name == "text_detector"
    assert gcs.names(RESULTS) == ["text_detector/triggerfish-images/cat.jpg.json"]


def test_only_an_item_whose_caller_asked_for_the_default_may_be_served_by_another_default(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()

    _process(executor, gcs, _request(request_id="default"), models)
    _process(executor, gcs, _request(request_id="named", version="1"), models)

    [(_, asked_default), (_, named)] = models.items
    assert asked_default.default_prepared_as == preparation_key(InputSpec(height=32, width=32), PreprocessSpec())
    assert named.default_prepared_as is None


def test_an_invalid_uri_is_an_error_result_under_invalid(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, gcs, _request("https://example.com/cat.jpg"))

    assert _error(processed) is ErrorReason.INVALID_URI
    assert gcs.reads == []
    [name] = gcs.names(RESULTS)
    assert name.startswith("_invalid/")
    assert processed.result_uri == f"gs://{RESULTS}/{name}"
    result = _stored(gcs, name)
    assert result.model.name == "mobilenet_v2"  # the default model
    assert "https://example.com/cat.jpg" in (result.error.message if result.error else "")


def test_a_bucket_outside_the_allow_list_is_an_error_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, gcs, _request("gs://someone-elses/cat.jpg"))

    assert _error(processed) is ErrorReason.BUCKET_NOT_ALLOWED
    assert gcs.reads == []
    assert gcs.names(RESULTS) == ["mobilenet_v2/someone-elses/cat.jpg.json"]


def test_an_unknown_model_is_an_error_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()

    processed = _process(executor, gcs, _request(model="resnet50"), models)

    assert _error(processed) is ErrorReason.UNKNOWN_MODEL
    assert processed.result is not None and processed.result.error is not None
    assert "'resnet50'" in processed.result.error.message
    assert "['mobilenet_v2', 'text_detector']" in processed.result.error.message
    assert models.described == [] and gcs.reads == [] and models.calls == []
    assert gcs.names(RESULTS) == ["resnet50/triggerfish-images/cat.jpg.json"]


def test_an_unknown_version_is_an_error_result_naming_it(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, gcs, _request(version="7"))

    assert _error(processed) is ErrorReason.UNKNOWN_VERSION
    # The record names no version (none was resolved), so it cannot outrank a real result.
    assert processed.result is not None and processed.result.model.version is None
    assert gcs.names(RESULTS) == [CAT_RESULT]


def test_a_transient_describe_failure_is_returned_and_stores_nothing(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels(
        describe_error=TransientError("no version of model mobilenet_v2 is loaded yet")
    )

    [answer] = _many(executor, gcs, [_request()], models)

    assert isinstance(answer, TransientError) and "loaded yet" in str(answer)
    assert gcs.reads == [] and gcs.names(RESULTS) == []


def test_a_missing_object_is_an_error_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(
        executor, gcs, _request("gs://triggerfish-images/gone.jpg", generation="5")
    )

    assert _error(processed) is ErrorReason.OBJECT_MISSING
    assert processed.result is not None
    assert processed.result.model.version == "1"
    # No read confirmed generation 5: the record names none, so it never outranks a later upload.
    assert processed.result.source.generation is None
    assert gcs.names(RESULTS) == ["mobilenet_v2/triggerfish-images/gone.jpg.json"]


def test_an_object_over_the_size_limit_is_an_error_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    gcs.put(IMAGES, "huge.jpg", b"\xff" * 1_000_001)

    processed = _process(executor, gcs, _request("gs://triggerfish-images/huge.jpg"))

    assert _error(processed) is ErrorReason.IMAGE_TOO_LARGE
    assert gcs.reads[0][2] == SETTINGS.max_image_bytes


def test_bytes_that_are_not_an_image_are_an_error_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    gcs.put(IMAGES, "cat.jpg", b"GIF? no.", generation=GENERATION + 1)
    models = FakeModels()

    processed = _process(executor, gcs, _request(), models)

    assert _error(processed) is ErrorReason.NOT_AN_IMAGE
    assert processed.result is not None
    assert processed.result.source.generation == str(GENERATION + 1)
    assert models.calls == []
    assert gcs.names(RESULTS) == [CAT_RESULT]


def test_any_decoder_exception_is_pinned_on_its_image_alone(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pipeline_module.prepare_image
    broken = b"\x89PNG broken chunk"

    def prepare_image(data: bytes, *args: Any) -> Any:
        if data == broken:
            raise SyntaxError("broken PNG file")  # not what a decoder documents
        return real(data, *args)

    monkeypatch.setattr(pipeline_module, "prepare_image", prepare_image)
    gcs.put(IMAGES, "broken.png", broken)
    models = FakeModels()

    bad, good = _many(
        executor, gcs, [_request(f"gs://{IMAGES}/broken.png"), _request(request_id="m-2")], models
    )

    assert isinstance(bad, Processed) and _error(bad) is ErrorReason.NOT_AN_IMAGE
    assert bad.result is not None and bad.result.error is not None
    assert (
        "cannot decode image" in bad.result.error.message
        and "broken PNG" in bad.result.error.message
    )
    assert (
        isinstance(good, Processed) and good.result is not None and good.result.status is Status.OK
    )
    assert len(models.items) == 1


def test_an_inference_failure_outcome_is_an_error_result_with_backend(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    failed = ItemOutcome(
        version="1",
        backend="tensorrt:fp16:sm_90",
        batch_size=1,
        queue_wait_ms=2.0,
        error_reason=ErrorReason.INFERENCE_FAILED,
        error_message="inference failed for this image",
    )
    models = FakeModels(answer=lambda item: failed)

    processed = _process(executor, gcs, _request(), models)

    assert _error(processed) is ErrorReason.INFERENCE_FAILED
    result = processed.result
    assert result is not None
    assert result.backend == "tensorrt:fp16:sm_90"
    assert (result.timings.batch_size, result.timings.queue_wait_ms) == (1, 2.0)
    assert result.model.version == "1"
    assert _stored(gcs).status is Status.ERROR


def test_a_rejection_from_the_model_is_recorded_as_its_error(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels(
        answer=lambda item: Rejection(ErrorReason.INFERENCE_FAILED, "tensor does not fit")
    )

    processed = _process(executor, gcs, _request(), models)

    assert _error(processed) is ErrorReason.INFERENCE_FAILED
    assert _stored(gcs).error is not None
    assert _stored(gcs).error.message == "tensor does not fit"  # type: ignore[union-attr]


def test_a_retry_from_the_model_is_transient_and_stores_nothing(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels(answer=lambda item: Retry("model replica unhealthy"))

    [answer] = _many(executor, gcs, [_request()], models)

    assert type(answer) is TransientError and "unhealthy" in str(answer)
    assert gcs.names(RESULTS) == []


def test_an_overloaded_model_sheds_with_its_retry_after(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels(answer=lambda item: Retry("queue full", overloaded=True, retry_after_s=7.5))

    [answer] = _many(executor, gcs, [_request()], models)

    assert isinstance(answer, ShedError) and isinstance(answer, TransientError)
    assert answer.retry_after_s == 7.5
    assert gcs.names(RESULTS) == []


def test_a_failed_model_call_fails_every_item_of_it_and_stores_nothing(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    cause = TransientError("replica died")
    models = FakeModels(infer_error=WrappedByRay(cause))
    gcs.put(IMAGES, "dog.jpg", CAT_BYTES)

    answers = _many(
        executor, gcs, [_request(), _request(f"gs://{IMAGES}/dog.jpg", request_id="m-2")], models
    )

    assert [unwrap(a) for a in answers] == [cause, cause]  # type: ignore[arg-type]
    assert gcs.names(RESULTS) == []


def test_unwrap_returns_the_replica_exception() -> None:
    cause = PermanentError(ErrorReason.UNKNOWN_VERSION, "no version '9'")

    assert unwrap(WrappedByRay(cause)) is cause
    assert unwrap(cause) is cause


def test_a_superseded_generation_stores_nothing(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    # The event names generation 5; the object was replaced since.
    processed = _process(executor, gcs, _request(generation="5", request_id="up-1"))

    assert processed == Processed("up-1", None, None, superseded=True)
    assert gcs.names(RESULTS) == []
    assert processed.to_dict() == {"request_id": "up-1", "status": "superseded", "result_uri": None}


def test_a_transient_read_failure_is_returned_and_stores_nothing(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    gcs.read_error = TransientError("Cloud Storage answered 503")

    [answer] = _many(executor, gcs, [_request()])

    assert isinstance(answer, TransientError) and "503" in str(answer)
    assert gcs.names(RESULTS) == []


def test_a_failed_result_write_is_returned_as_transient(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    gcs.write_error = TransientError("Cloud Storage answered 500 writing")

    [answer] = _many(executor, gcs, [_request()])

    assert isinstance(answer, TransientError) and "500 writing" in str(answer)


def test_a_newer_stored_result_is_kept_and_the_answer_says_superseded(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    newer = InferenceResult(
        source=SourceRef(uri=CAT, generation=str(GENERATION + 10)),
        model=ModelRef(name="mobilenet_v2", version="1"),
        status=Status.OK,
        labels=[],
        request_id="newer",
        entry_path=EntryPath.UPLOAD,
    )
    gcs.put(RESULTS, CAT_RESULT, newer.to_json().encode(), result_metadata(newer))

    processed = _process(executor, gcs, _request(generation=str(GENERATION)))

    assert processed.superseded and processed.result_uri == f"gs://{RESULTS}/{CAT_RESULT}"
    answer = processed.to_dict()  # the computed result, flagged, pointing at the kept one
    assert answer["superseded"] is True and answer["request_id"] == "m-1"
    assert answer["result_uri"] == f"gs://{RESULTS}/{CAT_RESULT}"
    assert _stored(gcs).request_id == "newer"


def test_an_ok_result_replaces_an_error_for_the_same_generation(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    failing = FakeModels(answer=lambda item: Rejection(ErrorReason.INFERENCE_FAILED, "flaky"))
    _process(executor, gcs, _request(generation=str(GENERATION)), failing)
    assert _stored(gcs).status is Status.ERROR

    processed = _process(executor, gcs, _request(generation=str(GENERATION), request_id="m-2"))

    assert not processed.superseded
    assert (_stored(gcs).status, _stored(gcs).request_id) == (Status.OK, "m-2")


def test_processed_to_dict_is_the_result_json_plus_its_uri(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    body = _process(executor, gcs, _request()).to_dict()

    assert body["status"] == "ok"
    assert body["result_uri"] == f"gs://{RESULTS}/{CAT_RESULT}"
    assert body["labels"][0] == {"class_id": 281, "label": "tabby", "score": 0.9}
    assert "error" not in body
    assert json.dumps(body)  # JSON-ready


def test_one_call_per_model_carries_all_its_items_and_answers_keep_their_order(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    for i in range(5):
        gcs.put(IMAGES, f"{i}.jpg", CAT_BYTES)
    models = FakeModels()
    requests = [
        _request(f"gs://{IMAGES}/{i}.jpg", request_id=f"m/{i}", model=model)
        for i, model in enumerate(
            ["mobilenet_v2", "text_detector", "mobilenet_v2", "text_detector", "mobilenet_v2"]
        )
    ]
    requests.insert(2, _request("gs://someone-elses/x.jpg", request_id="m/bad"))

    answers = _many(executor, gcs, requests, models, deadline=1234.5)

    assert [a.request_id for a in answers] == [r.request_id for r in requests]  # type: ignore[union-attr]
    assert sorted((model, len(items)) for model, items, _ in models.calls) == [
        ("mobilenet_v2", 3),
        ("text_detector", 2),
    ]
    assert {deadline for _, _, deadline in models.calls} == {1234.5}
    assert _error(answers[2]) is ErrorReason.BUCKET_NOT_ALLOWED  # type: ignore[arg-type]
    assert sorted(gcs.names(RESULTS)) == sorted(
        [
            f"{r.model}/triggerfish-images/{i}.jpg.json"
            for i, r in enumerate(r for r in requests if r.request_id != "m/bad")
        ]
        + ["mobilenet_v2/someone-elses/x.jpg.json"]
    )


def test_each_item_gets_the_answer_given_for_it(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    for i in range(3):
        gcs.put(IMAGES, f"{i}.jpg", CAT_BYTES)
    answers = iter(
        [
            _tabby,
            lambda item: Retry("later"),
            lambda item: Rejection(ErrorReason.INFERENCE_FAILED, "bad"),
        ]
    )
    models = FakeModels(answer=lambda item: next(answers)(item))
    requests = [_request(f"gs://{IMAGES}/{i}.jpg", request_id=f"m/{i}") for i in range(3)]

    ok, retry, rejected = _many(executor, gcs, requests, models)

    assert isinstance(ok, Processed) and ok.result is not None and ok.result.status is Status.OK
    assert isinstance(retry, TransientError)
    assert isinstance(rejected, Processed) and _error(rejected) is ErrorReason.INFERENCE_FAILED
    assert sorted(gcs.names(RESULTS)) == [
        "mobilenet_v2/triggerfish-images/0.jpg.json",
        "mobilenet_v2/triggerfish-images/2.jpg.json",
    ]


# --- process_bytes ----------------------------------------------------------------------


def test_process_bytes_stores_under_the_content_hash(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()
    digest = hashlib.sha256(CAT_BYTES).hexdigest()

    processed = asyncio.run(
        _pipeline(executor, gcs, models).process_bytes(CAT_BYTES, None, None, "http-1", 99.0)
    )

    result = processed.result
    assert result is not None and result.status is Status.OK
    assert result.source.uri == f"sha256:{digest}"
    assert (result.request_id, result.entry_path) == ("http-1", EntryPath.HTTP)
    assert gcs.reads == []
    assert [deadline for _, _, deadline in models.calls] == [99.0]
    name = f"mobilenet_v2/{RESULTS}/_http/{digest}.json"
    assert gcs.names(RESULTS) == [name]
    assert processed.result_uri == f"gs://{RESULTS}/{name}"
    assert _stored(gcs, name) == result


def test_process_bytes_records_an_oversize_body_as_an_error(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()
    body = b"\xff" * 1_000_001

    processed = asyncio.run(
        _pipeline(executor, gcs, models).process_bytes(body, None, None, "http-2")
    )

    assert _error(processed) is ErrorReason.IMAGE_TOO_LARGE
    assert processed.result is not None and processed.result.error is not None
    assert "1000001 bytes, limit 1000000" in processed.result.error.message
    assert models.calls == [] and models.described == []
    digest = hashlib.sha256(body).hexdigest()
    assert gcs.names(RESULTS) == [f"mobilenet_v2/{RESULTS}/_http/{digest}.json"]


def test_process_bytes_for_an_unknown_model_is_recorded(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    processed = asyncio.run(
        _pipeline(executor, gcs).process_bytes(CAT_BYTES, "resnet50", None, "http-3")
    )

    assert _error(processed) is ErrorReason.UNKNOWN_MODEL
    assert [n.split("/")[0] for n in gcs.names(RESULTS)] == ["resnet50"]


def test_process_bytes_raises_a_transient_model_answer(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels(answer=lambda item: Retry("queue full", overloaded=True, retry_after_s=3))

    with pytest.raises(ShedError) as info:
        asyncio.run(_pipeline(executor, gcs, models).process_bytes(CAT_BYTES, None, None, "http-4"))

    assert info.value.retry_after_s == 3
    assert gcs.names(RESULTS) == []


def test_a_request_for_a_version_that_does_not_exist_keeps_the_stored_ok_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    _process(executor, gcs, _request(generation=str(GENERATION)))

    processed = _process(
        executor, gcs, _request(generation=str(GENERATION), version="99", request_id="bogus")
    )

    assert _error(processed) is ErrorReason.UNKNOWN_VERSION
    assert (_stored(gcs).status, _stored(gcs).model.version) == (Status.OK, "1")
    # The outranked error is kept where its request id finds it, and the answer says where.
    record = superseded_error_object_name("bogus", CAT)
    assert processed.superseded and processed.error_record_uri == f"gs://{RESULTS}/{record}"
    assert processed.to_dict()["error_record_uri"] == processed.error_record_uri
    assert _stored(gcs, record).error is not None


def test_an_unknown_version_from_a_replica_never_outranks_a_stored_ok_result(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    _process(executor, gcs, _request(generation=str(GENERATION)))
    # A replica that refuses the version another replica resolved (split brain).
    models = FakeModels(answer=lambda item: Rejection(ErrorReason.UNKNOWN_VERSION, "no version '1' here"))

    processed = _process(executor, gcs, _request(generation=str(GENERATION), request_id="m-2"), models)

    assert processed.result is not None and processed.result.model.version is None
    assert processed.superseded
    assert (_stored(gcs).status, _stored(gcs).model.version) == (Status.OK, "1")


def test_an_out_of_memory_decode_is_transient_not_a_bad_image(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    def prepare_image(data: bytes, *args: Any) -> Any:
        raise OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")

    monkeypatch.setattr(pipeline_module, "prepare_image", prepare_image)

    [answer] = _many(executor, gcs, [_request()])

    assert isinstance(answer, TransientError) and "out of memory" in str(answer)
    assert gcs.names(RESULTS) == []


# --- models that decode on their GPU ---------------------------------------------------


@dataclass
class DeviceModels(FakeModels):
    """Version 1 decodes on its replica's GPU: the pipeline must send bytes, not pixels."""

    async def describe(self, model: str, version: str | None) -> VersionInfo:
        info = await super().describe(model, version)
        return replace(info, decode="nvimgcodec:cuda:0")


def _decoded_on_device(item: Any) -> Answer:
    assert isinstance(item, EncodedItem), item
    return ItemOutcome(
        version=item.version, backend="onnxruntime:CUDAExecutionProvider", labels=TABBY,
        decode="nvimgcodec:cuda:0", decode_ms=2.5, engine_source="gcs", batch_size=1,
    )  # fmt: skip


def test_a_model_that_decodes_on_its_gpu_gets_the_fetched_bytes(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = DeviceModels(answer=_decoded_on_device)
    monkeypatch.setattr(pipeline_module, "prepare_image", _no_decoding_here)

    processed = _process(executor, gcs, _request(generation=str(GENERATION)), models)
    posted = asyncio.run(_pipeline(executor, gcs, models).process_bytes(CAT_BYTES, None, None, "http-1"))

    assert [item.data for _, item in models.items] == [CAT_BYTES, CAT_BYTES]
    for result in (processed.result, posted.result):
        assert result is not None and result.status is Status.OK and result.labels == TABBY
        assert (result.decode, result.engine_source) == ("nvimgcodec:cuda:0", "gcs")
        assert result.timings.decode_ms == 2.5  # the replica's, not the ingress's
    stored = json.loads(gcs.get(RESULTS, CAT_RESULT).data)  # type: ignore[union-attr]
    assert stored["decode"] == "nvimgcodec:cuda:0" and stored["engine_source"] == "gcs"


def test_a_cpu_model_still_gets_pixels_decoded_here(gcs: InMemoryGcs, executor: ThreadPoolExecutor) -> None:
    models = FakeModels()

    processed = _process(executor, gcs, _request(), models)

    [(_, item)] = models.items
    assert isinstance(item, BatchItem) and item.pixels.shape == (32, 32, 3)
    assert processed.result is not None and processed.result.timings.decode_ms is not None


def _no_decoding_here(*args: Any) -> Any:
    raise AssertionError("the ingress decoded an image for a model that decodes on its GPU")


class GatedStorage(InMemoryGcs):
    """Bulk reads (or writes) wait at a gate; counts the bulk ones in flight at once."""

    def __init__(self, gated: str) -> None:
        super().__init__()
        self.gated = gated  # "read" or "write"
        self.gate = asyncio.Event()
        self.in_flight = 0
        self.most = 0

    async def _gated(self, bulk: bool, call: Any) -> Any:
        if not bulk:
            return await call
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.gate.wait()
            return await call
        finally:
            self.in_flight -= 1

    async def read(self, uri: Any, generation: str | None, max_bytes: int) -> tuple[bytes, str]:
        bulk = self.gated == "read" and uri.name.startswith("bulk")
        return await self._gated(bulk, super().read(uri, generation, max_bytes))

    async def write(self, bucket: str, name: str, payload: bytes, **kwargs: Any) -> Any:
        bulk = self.gated == "write" and "/bulk-" in name
        return await self._gated(bulk, super().write(bucket, name, payload, **kwargs))


@pytest.mark.parametrize("gated", ["read", "write"])
def test_bulk_inputs_are_fetched_and_stored_a_few_at_a_time_and_live_work_never_waits_for_them(
    executor: ThreadPoolExecutor, gated: str
) -> None:
    gcs = GatedStorage(gated)
    for i in range(20):
        gcs.put(IMAGES, f"bulk-{i:02d}.jpg", CAT_BYTES)
    gcs.put(IMAGES, "live.jpg", CAT_BYTES)
    pipeline = InferencePipeline(SETTINGS, FakeModels(), gcs, executor, bulk_prepares=3)  # type: ignore[arg-type]
    bulk = [
        _request(f"gs://{IMAGES}/bulk-{i:02d}.jpg", request_id=f"b-{i}", priority=Priority.BULK) for i in range(20)
    ]

    async def scenario() -> tuple[list[Processed | BaseException], list[Processed | BaseException]]:
        backfill = asyncio.ensure_future(pipeline.process_many(bulk))
        while gcs.in_flight < 3:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # room for a fourth, if anything let one start
        # Three bulk reads (or writes) hold every slot and are stuck: the live input is done anyway.
        live = await asyncio.wait_for(pipeline.process_many([_request(f"gs://{IMAGES}/live.jpg")]), 10)
        gcs.gate.set()
        return live, await backfill

    live, done = asyncio.run(scenario())

    assert gcs.most == 3
    assert all(isinstance(a, Processed) and a.result and a.result.status is Status.OK for a in live + done)
    assert len(done) == 20 and len(gcs.names(RESULTS)) == 21


def test_bulk_preparation_slots_must_be_positive(gcs: InMemoryGcs, executor: ThreadPoolExecutor) -> None:
    with pytest.raises(ValueError, match="bulk_prepares must be >= 1, got 0"):
        InferencePipeline(SETTINGS, FakeModels(), gcs, executor, bulk_prepares=0)  # type: ignore[arg-type]


def test_each_inputs_answer_is_reported_settled_once_as_soon_as_it_is_known(
    gcs: InMemoryGcs, executor: ThreadPoolExecutor
) -> None:
    settled: list[int] = []
    requests = [_request(CAT, request_id="a"), _request("gs://elsewhere/x.jpg", request_id="b"), _request(CAT, request_id="c")]

    async def run() -> list[Processed | BaseException]:
        return await _pipeline(executor, gcs).process_many(requests, None, settled.append)

    answers = asyncio.run(run())
    assert all(isinstance(a, Processed) for a in answers)
    assert settled[0] == 1  # the refused bucket is recorded before the others reach the model
    assert sorted(settled) == [0, 1, 2]


class StartOrder(InMemoryGcs):
    """Records the order in which reads start; they finish when the gate opens."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.started: list[str] = []

    async def read(self, uri: Any, generation: str | None, max_bytes: int) -> tuple[bytes, str]:
        self.started.append(uri.name)
        await self.gate.wait()
        return await super().read(uri, generation, max_bytes)


def test_live_reads_are_bounded_and_the_free_slots_go_to_the_calls_in_turn(executor: ThreadPoolExecutor) -> None:
    gcs = StartOrder()
    for name in [*(f"many-{i}.jpg" for i in range(6)), "one.jpg"]:
        gcs.put(IMAGES, name, CAT_BYTES)
    pipeline = InferencePipeline(SETTINGS, FakeModels(), gcs, executor, live_storage=2)  # type: ignore[arg-type]

    async def run() -> None:
        many = asyncio.ensure_future(
            pipeline.process_many([_request(f"gs://{IMAGES}/many-{i}.jpg", request_id=f"m{i}") for i in range(6)])
        )
        while len(gcs.started) < 2:
            await asyncio.sleep(0.001)
        one = asyncio.ensure_future(pipeline.process_many([_request(f"gs://{IMAGES}/one.jpg", request_id="one")]))
        await asyncio.sleep(0.01)
        assert gcs.started == ["many-0.jpg", "many-1.jpg"]  # two at a time
        gcs.gate.set()
        await asyncio.gather(many, one)

    asyncio.run(run())
    # The one-image call's read starts after one more of the call that came first, not after all of them.
    assert gcs.started.index("one.jpg") == 3, gcs.started
