"""The ingress pipeline over a fake model client, with GCS replaced by recorders."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import serve.pipeline as pipeline_module
from serve.batch import BatchItem, ItemOutcome
from serve.model_config import InputSpec, PreprocessSpec
from serve.model_server import VersionInfo
from serve.pipeline import InferencePipeline, Processed, unwrap
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError, SupersededError, TransientError
from shared.messages import EntryPath, InferenceRequest
from shared.result_store import result_name
from shared.results import InferenceResult, Label, Status
from shared.uris import GcsUri

CAT_BYTES = (Path(__file__).resolve().parents[3] / "infra" / "samples" / "cat.jpg").read_bytes()
CAT = "gs://triggerfish-images/cat.jpg"
SETTINGS = Settings(
    results_bucket="triggerfish-results",
    allowed_buckets=frozenset({"triggerfish-images"}),
    max_image_bytes=1_000_000,
)
TABBY = [
    Label(class_id=281, label="tabby", score=0.9),
    Label(class_id=282, label="tiger cat", score=0.05),
]


class WrappedByRay(PermanentError):
    """What Ray re-raises: an exception whose ``.cause`` is the replica's original one."""

    def __init__(self, cause: PermanentError) -> None:
        super().__init__(ErrorReason.INFERENCE_FAILED, "ray wrapper")
        self.cause = cause


@dataclass
class FakeModels:
    """A :class:`serve.pipeline.ModelClient` serving ``mobilenet_v2`` version 1 only."""

    outcome: ItemOutcome | None = None
    describe_error: Exception | None = None
    items: list[tuple[str, BatchItem]] = field(default_factory=list)
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

    async def infer(self, model: str, item: BatchItem) -> ItemOutcome:
        self.items.append((model, item))
        return self.outcome or ItemOutcome(
            version=item.version,
            backend="onnxruntime:CPUExecutionProvider",
            labels=TABBY,
            queue_wait_ms=1.5,
            inference_ms=3.25,
            batch_size=2,
        )


@dataclass
class Gcs:
    """Recorders standing in for ``read_object`` and ``store_result``."""

    data: bytes = CAT_BYTES
    generation: str = "1795239515643133"
    read_error: Exception | None = None
    keep_newer: bool = False
    reads: list[tuple[GcsUri, str | None, int]] = field(default_factory=list)
    stored: list[tuple[str, InferenceResult, GcsUri | None]] = field(default_factory=list)

    def read_object(self, uri: GcsUri, generation: str | None, max_bytes: int) -> tuple[bytes, str]:
        self.reads.append((uri, generation, max_bytes))
        if self.read_error is not None:
            raise self.read_error
        return self.data, self.generation

    def store_result(
        self, bucket: str, result: InferenceResult, source: GcsUri | None
    ) -> str | None:
        self.stored.append((bucket, result, source))
        return None if self.keep_newer else f"gs://{bucket}/{result_name(result, source)}"

    @property
    def names(self) -> list[str]:
        return [result_name(result, source) for _, result, source in self.stored]


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> Gcs:
    fake = Gcs()
    monkeypatch.setattr(pipeline_module, "read_object", fake.read_object)
    monkeypatch.setattr(pipeline_module, "store_result", fake.store_result)
    return fake


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def _request(uri: str = CAT, **fields: Any) -> InferenceRequest:
    return InferenceRequest(
        uri=uri, request_id=fields.pop("request_id", "m-1"), entry_path=EntryPath.PUBSUB, **fields
    )


def _process(
    executor: ThreadPoolExecutor, request: InferenceRequest, models: FakeModels | None = None
) -> Processed:
    pipeline = InferencePipeline(SETTINGS, models or FakeModels(), executor)
    return asyncio.run(pipeline.process(request))


def _error(processed: Processed) -> ErrorReason:
    assert processed.result is not None
    assert processed.result.status is Status.ERROR
    assert processed.result.error is not None
    return processed.result.error.reason


def test_an_image_gets_an_ok_result_with_labels_and_timings(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()

    processed = _process(executor, _request(generation="1795239515643133"), models)

    result = processed.result
    assert result is not None and result.status is Status.OK
    assert result.labels == TABBY
    assert result.backend == "onnxruntime:CPUExecutionProvider"
    assert (result.model.name, result.model.version) == ("mobilenet_v2", "1")
    assert (result.source.uri, result.source.generation) == (CAT, "1795239515643133")
    assert (result.request_id, result.entry_path) == ("m-1", EntryPath.PUBSUB)
    t = result.timings
    assert (t.queue_wait_ms, t.inference_ms, t.batch_size) == (1.5, 3.25, 2)
    assert t.fetch_ms is not None and t.fetch_ms >= 0
    assert t.decode_ms is not None and t.decode_ms > 0
    assert t.end_to_end_ms is not None and t.end_to_end_ms >= t.decode_ms
    # The image was fetched at the notified generation and preprocessed for the version.
    assert gcs.reads == [(GcsUri("triggerfish-images", "cat.jpg"), "1795239515643133", 1_000_000)]
    [(model, item)] = models.items
    assert model == "mobilenet_v2" and item.version == "1"
    assert item.pixels.shape == (32, 32, 3)
    assert (item.geometry.original_height, item.geometry.original_width) == (300, 451)
    # Stored once, at the deterministic name.
    assert gcs.names == ["mobilenet_v2/1/triggerfish-images/cat.jpg.json"]
    assert gcs.stored[0][0] == "triggerfish-results"
    assert gcs.stored[0][1] is result
    assert (
        processed.result_uri
        == "gs://triggerfish-results/mobilenet_v2/1/triggerfish-images/cat.jpg.json"
    )


def test_the_generation_actually_read_is_recorded(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    gcs.generation = "42"

    processed = _process(executor, _request())

    assert gcs.reads[0][1] is None  # no generation known: read the current one
    assert processed.result is not None
    assert processed.result.source.generation == "42"


def test_the_requested_model_and_version_are_used(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    models = FakeModels()

    processed = _process(executor, _request(model="text_detector", version="1"), models)

    assert models.described == [("text_detector", "1")]
    assert processed.result is not None and processed.result.model.name == "text_detector"
    assert gcs.names == ["text_detector/1/triggerfish-images/cat.jpg.json"]


def test_an_invalid_uri_is_an_error_result_under_invalid(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, _request("https://example.com/cat.jpg"))

    assert _error(processed) is ErrorReason.INVALID_URI
    assert gcs.reads == []
    [(bucket, result, source)] = gcs.stored
    assert bucket == "triggerfish-results" and source is None
    assert gcs.names[0].startswith("_invalid/")
    assert processed.result_uri == f"gs://triggerfish-results/{gcs.names[0]}"
    assert result.model.name == "mobilenet_v2"  # the default model
    assert "https://example.com/cat.jpg" in (result.error.message if result.error else "")


def test_a_bucket_outside_the_allow_list_is_an_error_result(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, _request("gs://someone-elses/cat.jpg"))

    assert _error(processed) is ErrorReason.BUCKET_NOT_ALLOWED
    assert gcs.reads == []
    assert gcs.names == ["mobilenet_v2/_/someone-elses/cat.jpg.json"]


def test_an_unknown_model_is_an_error_result(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    models = FakeModels()

    processed = _process(executor, _request(model="resnet50"), models)

    assert _error(processed) is ErrorReason.UNKNOWN_MODEL
    assert processed.result is not None and processed.result.error is not None
    assert "'resnet50'" in processed.result.error.message
    assert "['mobilenet_v2', 'text_detector']" in processed.result.error.message
    assert models.described == [] and gcs.reads == []
    assert gcs.names == ["resnet50/_/triggerfish-images/cat.jpg.json"]


def test_an_unknown_version_is_an_error_result_naming_it(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    processed = _process(executor, _request(version="7"))

    assert _error(processed) is ErrorReason.UNKNOWN_VERSION
    assert gcs.names == ["mobilenet_v2/7/triggerfish-images/cat.jpg.json"]


def test_an_error_wrapped_by_ray_is_reported_by_its_cause(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    cause = PermanentError(ErrorReason.UNKNOWN_VERSION, "no version '9'")
    models = FakeModels(describe_error=WrappedByRay(cause))

    processed = _process(executor, _request(), models)

    assert _error(processed) is ErrorReason.UNKNOWN_VERSION
    assert processed.result is not None and processed.result.error is not None
    assert processed.result.error.message == "no version '9'"
    assert unwrap(WrappedByRay(cause)) is cause
    assert unwrap(cause) is cause


def test_a_missing_object_is_an_error_result(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    gcs.read_error = PermanentError(ErrorReason.OBJECT_MISSING, f"{CAT} does not exist")

    processed = _process(executor, _request(generation="5"))

    assert _error(processed) is ErrorReason.OBJECT_MISSING
    assert processed.result is not None
    assert processed.result.model.version == "1"
    assert processed.result.source.generation == "5"
    assert gcs.names == ["mobilenet_v2/1/triggerfish-images/cat.jpg.json"]


def test_bytes_that_are_not_an_image_are_an_error_result(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    gcs.data = b"GIF? no."
    models = FakeModels()

    processed = _process(executor, _request(), models)

    assert _error(processed) is ErrorReason.NOT_AN_IMAGE
    assert processed.result is not None
    assert processed.result.source.generation == "1795239515643133"
    assert models.items == []
    assert len(gcs.stored) == 1


def test_an_inference_failure_outcome_is_an_error_result_with_backend(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels(
        outcome=ItemOutcome(
            version="1",
            backend="tensorrt:fp16:sm_90",
            batch_size=1,
            queue_wait_ms=2.0,
            error_reason=ErrorReason.INFERENCE_FAILED,
            error_message="inference failed for this image",
        )
    )

    processed = _process(executor, _request(), models)

    assert _error(processed) is ErrorReason.INFERENCE_FAILED
    result = processed.result
    assert result is not None
    assert result.backend == "tensorrt:fp16:sm_90"
    assert (result.timings.batch_size, result.timings.queue_wait_ms) == (1, 2.0)
    assert result.model.version == "1"
    assert len(gcs.stored) == 1


def test_a_superseded_generation_stores_nothing(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    gcs.read_error = SupersededError("generation 5 was replaced by 6")

    processed = _process(executor, _request(generation="5", request_id="up-1"))

    assert processed == Processed("up-1", None, None)
    assert gcs.stored == []
    assert processed.to_dict() == {"request_id": "up-1", "status": "superseded", "result_uri": None}


def test_a_transient_read_failure_propagates_and_stores_nothing(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    gcs.read_error = TransientError("Cloud Storage failed: 503")

    with pytest.raises(TransientError, match="503"):
        _process(executor, _request())

    assert gcs.stored == []


def test_a_newer_stored_result_is_kept(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    gcs.keep_newer = True

    processed = _process(executor, _request(generation="5"))

    assert processed.result is None and processed.result_uri is None
    assert len(gcs.stored) == 1


def test_processed_to_dict_is_the_result_json_plus_its_uri(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    body = _process(executor, _request()).to_dict()

    assert body["status"] == "ok"
    assert (
        body["result_uri"]
        == "gs://triggerfish-results/mobilenet_v2/1/triggerfish-images/cat.jpg.json"
    )
    assert body["labels"][0] == {"class_id": 281, "label": "tabby", "score": 0.9}
    assert "error" not in body


def test_process_bytes_stores_under_the_content_hash(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    models = FakeModels()
    pipeline = InferencePipeline(SETTINGS, models, executor)
    digest = hashlib.sha256(CAT_BYTES).hexdigest()

    processed = asyncio.run(pipeline.process_bytes(CAT_BYTES, None, None, "http-1"))

    result = processed.result
    assert result is not None and result.status is Status.OK
    assert result.source.uri == f"sha256:{digest}"
    assert (result.request_id, result.entry_path) == ("http-1", EntryPath.HTTP)
    assert gcs.reads == []
    [(bucket, stored, source)] = gcs.stored
    assert stored is result
    assert source == GcsUri("triggerfish-results", f"_http/{digest}")
    assert processed.result_uri == (
        f"gs://triggerfish-results/mobilenet_v2/1/triggerfish-results/_http/{digest}.json"
    )


def test_process_bytes_rejects_an_oversize_body(gcs: Gcs, executor: ThreadPoolExecutor) -> None:
    models = FakeModels()
    pipeline = InferencePipeline(SETTINGS, models, executor)

    with pytest.raises(PermanentError) as info:
        asyncio.run(pipeline.process_bytes(b"\xff" * 1_000_001, None, None, "http-2"))

    assert info.value.reason is ErrorReason.IMAGE_TOO_LARGE
    assert "1000001 bytes, limit 1000000" in info.value.message
    assert gcs.stored == [] and models.items == []


def test_process_bytes_for_an_unknown_model_is_permanent(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    pipeline = InferencePipeline(SETTINGS, FakeModels(), executor)

    with pytest.raises(PermanentError) as info:
        asyncio.run(pipeline.process_bytes(CAT_BYTES, "resnet50", None, "http-3"))

    assert info.value.reason is ErrorReason.UNKNOWN_MODEL
    assert gcs.stored == []


def test_many_requests_run_concurrently_and_each_gets_its_own_result(
    gcs: Gcs, executor: ThreadPoolExecutor
) -> None:
    pipeline = InferencePipeline(SETTINGS, FakeModels(), executor)
    requests = [_request(f"gs://triggerfish-images/{i}.jpg", request_id=f"m/{i}") for i in range(5)]

    async def run_all() -> list[Processed]:
        return await asyncio.gather(*(pipeline.process(r) for r in requests))

    processed = asyncio.run(run_all())

    assert [p.request_id for p in processed] == [f"m/{i}" for i in range(5)]
    assert sorted(gcs.names) == sorted(
        f"mobilenet_v2/1/triggerfish-images/{i}.jpg.json" for i in range(5)
    )
