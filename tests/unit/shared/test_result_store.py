"""Conditional result writes: one object per input that never regresses.

Ranks: source generation, then model version, then ok over error. A lower rank is
dropped (``superseded``); an equal or higher one replaces, conditioned on the
generation that was read.
"""

from __future__ import annotations

import asyncio
import json
import random

import pytest

from shared.errors import ErrorReason, TransientError
from shared.gcs_limits import MAX_CUSTOM_METADATA_BYTES, custom_metadata_bytes
from shared.messages import EntryPath, InferenceRequest
from shared.result_store import (
    DETECTIONS_METADATA_KEY,
    ERROR_REASON_METADATA_KEY,
    GENERATION_METADATA_KEY,
    MODEL_METADATA_KEY,
    SOURCE_URI_METADATA_KEY,
    STATUS_METADATA_KEY,
    TOP_LABEL_METADATA_KEY,
    TOP_SCORE_METADATA_KEY,
    VERSION_METADATA_KEY,
    RecentWrites,
    StoredResult,
    rank,
    result_metadata,
    result_name,
    store_result,
)
from shared.results import (
    Detection,
    InferenceResult,
    Label,
    ModelRef,
    SourceRef,
    Status,
    superseded_error_object_name,
)
from shared.uris import GcsUri
from tests.fakes.fake_gcs import InMemoryGcs

BUCKET = "triggerfish-results"
SOURCE = GcsUri("triggerfish-images", "cat.jpg")
NAME = "mobilenet_v2/triggerfish-images/cat.jpg.json"
URI = f"gs://{BUCKET}/{NAME}"


def _ok(
    generation: str | None = "5", version: str | None = "1", request_id: str = "r"
) -> InferenceResult:
    return InferenceResult(
        source=SourceRef(uri=str(SOURCE), generation=generation),
        model=ModelRef(name="mobilenet_v2", version=version),
        status=Status.OK,
        labels=[],
        request_id=request_id,
        entry_path=EntryPath.PUBSUB,
    )


def _error(
    generation: str | None = "5", version: str | None = "1", request_id: str = "r"
) -> InferenceResult:
    request = InferenceRequest(
        uri=str(SOURCE), generation=generation, request_id=request_id, entry_path=EntryPath.PUBSUB
    )
    return InferenceResult.failure(
        request, ErrorReason.NOT_AN_IMAGE, "not an image", model="mobilenet_v2", version=version
    )


def _store(
    gcs: InMemoryGcs,
    result: InferenceResult,
    source: GcsUri | None = SOURCE,
    recent: RecentWrites | None = None,
) -> StoredResult:
    return asyncio.run(store_result(gcs, BUCKET, result, source, recent))  # type: ignore[arg-type]


def _stored_body(gcs: InMemoryGcs, name: str = NAME) -> dict:
    stored = gcs.get(BUCKET, name)
    assert stored is not None
    return json.loads(stored.data)


def _meta(generation: str | None, version: str | None, status: str) -> dict[str, str]:
    meta = {
        STATUS_METADATA_KEY: status,
        MODEL_METADATA_KEY: "mobilenet_v2",
        SOURCE_URI_METADATA_KEY: str(SOURCE),
    }
    if status == "error":
        meta[ERROR_REASON_METADATA_KEY] = "not_an_image"
    if generation is not None:
        meta[GENERATION_METADATA_KEY] = generation
    if version is not None:
        meta[VERSION_METADATA_KEY] = version
    return meta


# --- rank ------------------------------------------------------------------------------


def test_rank_orders_by_generation_then_version_then_status() -> None:
    ordered = [
        _meta(None, None, "error"),  # nothing known ranks lowest
        _meta("9", "10", "ok"),
        _meta("10", None, "ok"),  # a newer generation beats any version of an older one
        _meta("10", "beta", "ok"),  # a named version ranks below every numeric one
        _meta("10", "2", "error"),
        _meta("10", "2", "ok"),  # same generation and version: ok beats error
        _meta("10", "10", "error"),  # versions compare as numbers: 10 > 2
    ]

    ranks = [rank(m) for m in ordered]

    assert ranks == sorted(ranks)
    assert len(set(ranks)) == len(ranks)


def test_rank_treats_unreadable_metadata_as_lowest() -> None:
    assert rank({}) == rank({GENERATION_METADATA_KEY: "v2", STATUS_METADATA_KEY: "maybe"})
    assert rank({}) < rank(_meta("0", None, "error"))


def test_result_metadata_carries_the_rank_of_the_result() -> None:
    assert result_metadata(_ok("5", "1")) == _meta("5", "1", "ok")
    assert result_metadata(_error(None, None)) == _meta(None, None, "error")
    assert rank(result_metadata(_ok("5", "1"))) > rank(result_metadata(_error("5", "1")))


def test_result_metadata_summarizes_a_classification_by_its_top_label() -> None:
    result = _ok().model_copy(
        update={
            "labels": [
                Label(class_id=3, label="tiger shark", score=0.1),
                Label(class_id=281, label="tabby", score=0.873149),
            ]
        }
    )
    meta = result_metadata(result)
    assert meta[TOP_LABEL_METADATA_KEY] == "tabby"
    assert meta[TOP_SCORE_METADATA_KEY] == "0.8731"
    assert DETECTIONS_METADATA_KEY not in meta


def test_result_metadata_summarizes_detections_by_their_number() -> None:
    box = Detection(ymin=0, xmin=0, ymax=1, xmax=1, score=0.9, class_id=1, label="text")
    meta = result_metadata(_ok().model_copy(update={"labels": None, "detections": [box, box]}))
    assert meta[DETECTIONS_METADATA_KEY] == "2"
    assert TOP_LABEL_METADATA_KEY not in meta
    no_boxes = result_metadata(_ok().model_copy(update={"labels": None, "detections": []}))
    assert no_boxes[DETECTIONS_METADATA_KEY] == "0"


def test_result_metadata_stays_within_the_limit_for_any_source_uri() -> None:
    """A request's URI may be 2,048 characters of 4-byte UTF-8: it is cut, never a refused write."""
    request = InferenceRequest(
        uri="gs://x/" + "𝄞" * 2040, request_id="r", entry_path=EntryPath.PUBSUB
    )
    result = InferenceResult.failure(request, ErrorReason.INVALID_URI, "bad", model="m" * 300)
    meta = result_metadata(result)
    assert custom_metadata_bytes(meta) < MAX_CUSTOM_METADATA_BYTES // 2
    assert meta[SOURCE_URI_METADATA_KEY].startswith("gs://x/𝄞𝄞")
    assert len(meta[SOURCE_URI_METADATA_KEY].encode()) <= 1100


# --- store_result ----------------------------------------------------------------------


def test_the_first_result_is_created_with_one_write_and_no_read() -> None:
    gcs = InMemoryGcs()
    result = _ok()

    stored = _store(gcs, result)

    assert stored == StoredResult(URI, written=True, superseded=False)
    [write] = gcs.writes
    assert (write.name, write.if_generation_match, write.succeeded) == (NAME, 0, True)
    assert gcs.infos == []
    assert gcs.get(BUCKET, NAME).metadata == _meta("5", "1", "ok")  # type: ignore[union-attr]
    assert gcs.get(BUCKET, NAME).content_type == "application/json"  # type: ignore[union-attr]
    assert InferenceResult.model_validate(_stored_body(gcs)) == result


def test_an_equal_rank_replaces_so_the_object_names_the_latest_request() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok(request_id="first"))
    generation = gcs.get(BUCKET, NAME).generation  # type: ignore[union-attr]

    again = _store(gcs, _ok(request_id="redelivered"))

    assert again == StoredResult(URI, written=True, superseded=False)
    assert [(w.if_generation_match, w.succeeded) for w in gcs.writes] == [
        (0, True),
        (0, False),
        (generation, True),
    ]
    assert _stored_body(gcs)["request_id"] == "redelivered"


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        (_ok("5", "1"), _ok("6", "1")),
        (_ok("5", "1"), _ok("5", "2")),
        (_error("5", "1"), _ok("5", "1")),
        (_ok("5", None), _error("5", "1")),
    ],
    ids=["newer-generation", "newer-version", "ok-over-error", "known-version-over-none"],
)
def test_a_higher_rank_replaces_conditioned_on_the_generation_read(
    older: InferenceResult, newer: InferenceResult
) -> None:
    gcs = InMemoryGcs()
    _store(gcs, older)
    read_generation = gcs.get(BUCKET, NAME).generation  # type: ignore[union-attr]

    stored = _store(gcs, newer)

    assert stored == StoredResult(URI, written=True, superseded=False)
    # Create-only first, then one metadata read, then a write conditioned on what was read.
    assert [(w.if_generation_match, w.succeeded) for w in gcs.writes] == [
        (0, True),
        (0, False),
        (read_generation, True),
    ]
    assert gcs.infos == [(BUCKET, NAME)]
    assert gcs.get(BUCKET, NAME).metadata == result_metadata(newer)  # type: ignore[union-attr]
    assert InferenceResult.model_validate(_stored_body(gcs)) == newer


@pytest.mark.parametrize(
    ("kept", "offered"),
    [
        (_ok("6", "1"), _ok("5", "9")),
        (_ok("5", "2"), _ok("5", "1")),
        (_ok("5", "1"), _error("5", "1")),
    ],
    ids=["older-generation", "older-version", "error-under-ok"],
)
def test_a_lower_rank_is_dropped_and_reported_superseded(
    kept: InferenceResult, offered: InferenceResult
) -> None:
    gcs = InMemoryGcs()
    _store(gcs, kept)

    stored = _store(gcs, offered)

    assert (stored.uri, stored.written, stored.superseded) == (URI, False, True)
    assert [w.succeeded for w in gcs.writes[:2]] == [True, False]
    assert gcs.get(BUCKET, NAME).metadata == result_metadata(kept)  # type: ignore[union-attr]


def test_an_outranked_error_is_kept_where_its_request_id_finds_it() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok("5", "1"))
    # An unknown version: recorded without a version, so the ok result outranks it.
    offered = _error("5", None)

    stored = _store(gcs, offered)

    record = superseded_error_object_name(offered.request_id, offered.source.uri)
    assert stored.superseded and stored.error_record_uri == f"gs://{BUCKET}/{record}"
    assert record.startswith("_superseded/")
    assert InferenceResult.model_validate_json(gcs.get(BUCKET, record).data) == offered  # type: ignore[union-attr]
    assert gcs.get(BUCKET, NAME).metadata == result_metadata(_ok("5", "1"))  # type: ignore[union-attr]


def test_an_outranked_ok_result_leaves_no_record() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok("6", "1"))

    stored = _store(gcs, _ok("5", "1"))

    assert stored.superseded and stored.error_record_uri is None
    assert len(gcs.writes) == 2


def test_a_result_without_rank_metadata_is_replaced() -> None:
    gcs = InMemoryGcs()
    old = gcs.put(BUCKET, NAME, b'{"legacy": true}')

    stored = _store(gcs, _error("1", None))

    assert stored.written
    assert gcs.writes[-1].if_generation_match == old
    assert _stored_body(gcs)["status"] == "error"


def test_a_change_between_the_read_and_the_write_is_read_again() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok("5", request_id="gen-5"))
    concurrent = _ok("6", request_id="gen-6")

    def another_writer(bucket: str, name: str) -> None:
        # Right before our conditioned replace, another delivery lands generation 6.
        if len(gcs.writes) == 2:
            gcs.put(bucket, name, concurrent.to_json().encode(), result_metadata(concurrent))

    gcs.before_write = another_writer

    stored = _store(gcs, _ok("7", request_id="gen-7"))

    assert stored == StoredResult(URI, written=True, superseded=False)
    conditions = [w.if_generation_match for w in gcs.writes[1:]]
    assert [w.succeeded for w in gcs.writes[1:]] == [False, False, True]
    assert conditions[0] == 0 and conditions[1] != conditions[2]  # re-read, new condition
    assert len(gcs.infos) == 2
    assert _stored_body(gcs)["request_id"] == "gen-7"


def test_a_higher_rank_landing_during_the_retry_wins() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok("5"))
    newest = _ok("8", request_id="gen-8")

    def another_writer(bucket: str, name: str) -> None:
        if len(gcs.writes) == 2:
            gcs.put(bucket, name, newest.to_json().encode(), result_metadata(newest))

    gcs.before_write = another_writer

    stored = _store(gcs, _ok("7"))

    assert stored == StoredResult(URI, written=False, superseded=True)
    assert _stored_body(gcs)["request_id"] == "gen-8"


def test_a_result_deleted_between_the_read_and_the_write_is_created_again() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok("5"))

    def delete(bucket: str, name: str) -> None:
        if len(gcs.writes) == 2:
            del gcs.objects[(bucket, name)]

    gcs.before_write = delete

    stored = _store(gcs, _ok("6"))

    assert stored.written
    assert [(w.if_generation_match == 0, w.succeeded) for w in gcs.writes[1:]] == [
        (True, False),
        (False, False),
        (True, True),
    ]
    assert gcs.get(BUCKET, NAME).metadata[GENERATION_METADATA_KEY] == "6"  # type: ignore[union-attr]


def test_an_object_that_keeps_changing_is_a_transient_error() -> None:
    gcs = InMemoryGcs()
    _store(gcs, _ok("1"))
    gcs.before_write = lambda bucket, name: gcs.put(bucket, name, b"{}", _meta("1", None, "error"))

    with pytest.raises(TransientError, match="kept changing"):
        _store(gcs, _ok("2"))

    assert 2 < len(gcs.writes) <= 10  # bounded
    assert not any(w.succeeded for w in gcs.writes[1:])


def test_a_failed_write_propagates_as_transient() -> None:
    gcs = InMemoryGcs()
    gcs.write_error = TransientError("Cloud Storage answered 503")

    with pytest.raises(TransientError, match="503"):
        _store(gcs, _ok())

    assert gcs.objects == {}


def test_a_result_without_a_source_goes_under_invalid() -> None:
    gcs = InMemoryGcs()
    result = _error(None, None, request_id="m-9")

    stored = _store(gcs, result, source=None)

    assert stored.uri == f"gs://{BUCKET}/{result_name(result, None)}"
    assert stored.uri.startswith(f"gs://{BUCKET}/_invalid/")
    assert gcs.names(BUCKET) == [result_name(result, None)]


def test_concurrent_stores_keep_the_newest_generation() -> None:
    gcs = InMemoryGcs()
    generations = list(range(1, 51))
    random.Random(7).shuffle(generations)

    async def store_all() -> list[StoredResult]:
        return await asyncio.gather(
            *(
                store_result(gcs, BUCKET, _ok(str(g), request_id=f"g{g}"), SOURCE)
                for g in generations
            )  # type: ignore[arg-type]
        )

    stored = asyncio.run(store_all())

    assert _stored_body(gcs)["request_id"] == "g50"
    assert any(s.written for s in stored) and all(s.uri == URI for s in stored)
    assert gcs.get(BUCKET, NAME).metadata[GENERATION_METADATA_KEY] == "50"  # type: ignore[union-attr]


# --- remembered writes ------------------------------------------------------------------
def test_a_remembered_result_is_rewritten_in_one_conditional_request() -> None:
    gcs, recent = InMemoryGcs(), RecentWrites()
    _store(gcs, _ok(request_id="first"), recent=recent)
    generation = gcs.get(BUCKET, NAME).generation  # type: ignore[union-attr]

    again = _store(gcs, _ok(request_id="redelivered"), recent=recent)

    assert again == StoredResult(URI, written=True, superseded=False)
    assert [(w.if_generation_match, w.succeeded) for w in gcs.writes] == [
        (0, True),
        (generation, True),
    ]
    assert gcs.infos == []
    assert _stored_body(gcs)["request_id"] == "redelivered"


def test_a_higher_rank_over_a_remembered_result_needs_no_read() -> None:
    gcs, recent = InMemoryGcs(), RecentWrites()
    _store(gcs, _ok("5", "1"), recent=recent)

    stored = _store(gcs, _ok("6", "1"), recent=recent)

    assert stored == StoredResult(URI, written=True, superseded=False)
    assert gcs.infos == []
    assert gcs.get(BUCKET, NAME).metadata == _meta("6", "1", "ok")  # type: ignore[union-attr]


def test_a_stale_memory_falls_back_to_reading_and_never_regresses() -> None:
    gcs, recent = InMemoryGcs(), RecentWrites()
    _store(gcs, _ok("5", "1"), recent=recent)
    _store(gcs, _ok("9", "1"))  # another replica stores a newer upload's result
    reads = len(gcs.infos)

    stored = _store(gcs, _ok("5", "1", request_id="late"), recent=recent)

    assert stored == StoredResult(URI, written=False, superseded=True)
    assert len(gcs.infos) == reads + 1
    assert gcs.get(BUCKET, NAME).metadata == _meta("9", "1", "ok")  # type: ignore[union-attr]
    # What the read showed is remembered: the next late delivery is dropped after one read too.
    assert recent.get(URI) == (gcs.get(BUCKET, NAME).generation, rank(_meta("9", "1", "ok")))  # type: ignore[union-attr]


def test_an_equal_rank_over_a_stale_memory_still_replaces() -> None:
    """Another delivery of the same input rewrote the object since this process remembered it:
    the memory's generation is stale, and a third request of equal rank must still land."""
    gcs, recent = InMemoryGcs(), RecentWrites()
    _store(gcs, _ok(request_id="upload"), recent=recent)
    _store(gcs, _ok(request_id="upload-again"))  # the same notification handled by another process

    stored = _store(gcs, _ok(request_id="requested"), recent=recent)

    assert stored == StoredResult(URI, written=True, superseded=False)
    assert _stored_body(gcs)["request_id"] == "requested"


def test_a_remembered_result_that_was_deleted_is_written_again() -> None:
    gcs, recent = InMemoryGcs(), RecentWrites()
    _store(gcs, _ok(request_id="first"), recent=recent)
    del gcs.objects[(BUCKET, NAME)]

    stored = _store(gcs, _ok(request_id="again"), recent=recent)

    assert stored == StoredResult(URI, written=True, superseded=False)
    assert _stored_body(gcs)["request_id"] == "again"


def test_a_remembered_higher_rank_is_checked_not_trusted() -> None:
    # The stored result may have been deleted since (to recompute it): a lower rank is then written.
    gcs, recent = InMemoryGcs(), RecentWrites()
    _store(gcs, _ok("9", "1"), recent=recent)
    del gcs.objects[(BUCKET, NAME)]

    stored = _store(gcs, _ok("5", "1"), recent=recent)

    assert stored == StoredResult(URI, written=True, superseded=False)
    assert gcs.get(BUCKET, NAME).metadata == _meta("5", "1", "ok")  # type: ignore[union-attr]


def test_recent_writes_forget_the_least_recently_used() -> None:
    recent = RecentWrites(capacity=2)
    recent.put("a", 1, rank({}))
    recent.put("b", 2, rank({}))
    recent.get("a")
    recent.put("c", 3, rank({}))

    assert (recent.get("a"), recent.get("b"), len(recent)) == ((1, rank({})), None, 2)
    with pytest.raises(ValueError, match="capacity must be >= 1, got 0"):
        RecentWrites(capacity=0)
