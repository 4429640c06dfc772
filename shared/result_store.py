"""Writing result JSON: one object per (model, source object) that never regresses.

Every write is conditioned on the object's generation (``ifGenerationMatch``),
so concurrent deliveries cannot interleave a read-check-write. The first write
of a result is one request (``ifGenerationMatch=0``: only if absent); only when
a result is already there does the store read that result's metadata and
replace it, conditioned on the generation it read, unless the stored result
outranks the new one:

1. a newer source generation wins (a late event never undoes a newer upload);
2. for the same generation, a newer model version wins;
3. for the same generation and version, ``ok`` wins over ``error``.

An equal rank (a redelivery, a repeated request) replaces the stored result, so
the object names the latest request that produced it; its content is the same.

A :class:`RecentWrites` remembers the generation and rank of the results a
process wrote lately. A rewrite of one of them (a redelivery, the same image
posted again) then starts with a write conditioned on that generation: one
request instead of create, read and write. Wherever the memory is stale, the
condition fails and the store falls back to reading the object.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from shared.errors import TransientError
from shared.gcs import GcsClient, PreconditionFailed
from shared.results import (
    InferenceResult,
    Status,
    invalid_source_object_name,
    result_object_name,
    superseded_error_object_name,
    version_sort_key,
)
from shared.uris import GcsUri

logger = logging.getLogger(__name__)

# Object metadata on every result: the rank is read from metadata, never from the body.
GENERATION_METADATA_KEY = "triggerfish-source-generation"
VERSION_METADATA_KEY = "triggerfish-model-version"
STATUS_METADATA_KEY = "triggerfish-status"
# Not part of the rank: lets a listing tell which errors say nothing about the input.
ERROR_REASON_METADATA_KEY = "triggerfish-error-reason"
# Not part of the rank either: what a result event says (shared.result_events). The results
# bucket's Pub/Sub notification carries an object's custom metadata, so a consumer learns
# what a result says without reading it, and the hot path publishes nothing itself.
MODEL_METADATA_KEY = "triggerfish-model"
SOURCE_URI_METADATA_KEY = "triggerfish-source-uri"
TOP_LABEL_METADATA_KEY = "triggerfish-top-label"
TOP_SCORE_METADATA_KEY = "triggerfish-top-score"
DETECTIONS_METADATA_KEY = "triggerfish-detections"
# Caps in UTF-8 bytes that keep every result's metadata far below Cloud Storage's 8 KiB
# (shared.gcs_limits), which would otherwise refuse the write. Every valid gs:// URI
# (5 + 63 + 1 + 1024 bytes) fits; only a malformed request's URI is cut (the body has it whole).
_MAX_URI_BYTES = 1100
_MAX_NAME_BYTES = 256
# Each retry means another writer changed the object in between; a handful is plenty.
_MAX_ATTEMPTS = 8

Rank = tuple[int, tuple[int, int, str], int]


def result_name(result: InferenceResult, source: GcsUri | None) -> str:
    """Where ``result`` belongs: by model and source, or under ``_invalid/`` without a source."""
    if source is None:
        return invalid_source_object_name(result.request_id, result.source.uri)
    return result_object_name(result.model.name, source)


def result_metadata(result: InferenceResult) -> dict[str, str]:
    """The custom metadata of a result object: its rank, and what its event summarizes.

    Rank: status, source generation, model version. The rest (model, source URI, an
    error's reason, the top label and score of a classifier or the number of detections)
    is what :func:`shared.result_events.parse_result_notification` reads back.
    """
    meta = {
        STATUS_METADATA_KEY: result.status.value,
        MODEL_METADATA_KEY: _cut(result.model.name, _MAX_NAME_BYTES),
        SOURCE_URI_METADATA_KEY: _cut(result.source.uri, _MAX_URI_BYTES),
    }
    if result.error is not None:
        meta[ERROR_REASON_METADATA_KEY] = result.error.reason.value
    if result.source.generation:
        meta[GENERATION_METADATA_KEY] = result.source.generation
    if result.model.version:
        meta[VERSION_METADATA_KEY] = result.model.version
    if result.labels:
        top = max(result.labels, key=lambda label: label.score)
        meta[TOP_LABEL_METADATA_KEY] = _cut(top.label, _MAX_NAME_BYTES)
        meta[TOP_SCORE_METADATA_KEY] = f"{top.score:.4f}"
    if result.detections is not None:
        meta[DETECTIONS_METADATA_KEY] = str(len(result.detections))
    return meta


def _cut(text: str, max_bytes: int) -> str:
    """``text`` in at most ``max_bytes`` of UTF-8, cut at a character boundary.

    Characters without a UTF-8 form (lone surrogates from a malformed message) become
    ``?``: Cloud Storage stores metadata as UTF-8 and refuses anything else.
    """
    encoded = text.encode("utf-8", "replace")
    return encoded[:max_bytes].decode("utf-8", "ignore")


def rank(metadata: Mapping[str, str]) -> Rank:
    """Order of results for one object: source generation, then model version, then ok > error.

    Missing or unreadable fields rank lowest, so a result without them is replaced.
    """
    generation = metadata.get(GENERATION_METADATA_KEY, "")
    version = metadata.get(VERSION_METADATA_KEY)
    return (
        int(generation) if generation.isdigit() else -1,
        version_sort_key(version) if version else (-1, 0, ""),
        1 if metadata.get(STATUS_METADATA_KEY) == Status.OK.value else 0,
    )


@dataclass(frozen=True, slots=True)
class StoredResult:
    """Where the result for an input lives, and whether this call wrote it.

    ``superseded`` is true when the stored result outranks the one offered
    (a newer generation or version was already recorded); the offered one was dropped.
    """

    uri: str
    written: bool
    superseded: bool = False
    error_record_uri: str | None = None  # where a superseded error result was kept instead


class RecentWrites:
    """The generation and rank of the last ``capacity`` results this process wrote or read.

    Only a hint for the first attempt of :func:`store_result`: every write stays
    conditioned on a generation, so a stale entry costs one failed request.
    """

    def __init__(self, capacity: int = 10_000) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity!r}")
        self._capacity = capacity
        self._known: OrderedDict[str, tuple[int, Rank]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def get(self, uri: str) -> tuple[int, Rank] | None:
        known = self._known.get(uri)
        if known is not None:
            self._known.move_to_end(uri)
        return known

    def put(self, uri: str, generation: int, ranked: Rank) -> None:
        self._known[uri] = (generation, ranked)
        self._known.move_to_end(uri)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)


async def store_result(
    gcs: GcsClient,
    bucket: str,
    result: InferenceResult,
    source: GcsUri | None,
    recent: RecentWrites | None = None,
) -> StoredResult:
    """Write ``result`` unless a higher-ranked result is stored already.

    Raises:
        TransientError: Cloud Storage failed, or the object kept changing under us.
    """
    name = result_name(result, source)
    uri = f"gs://{bucket}/{name}"
    metadata = result_metadata(result)
    ours = rank(metadata)
    payload = result.to_json().encode()
    expected = 0  # first attempt: create only
    replacing_equal = False
    known = recent.get(uri) if recent is not None else None
    if known is not None and known[1] <= ours:
        # Stored by this process lately, and ours would replace it: write over that generation.
        # (A remembered higher rank is checked by reading: the object may have been deleted.)
        # A remembered generation is no sign of a concurrent writer: only an equal rank read
        # back after our own read-based attempt is (another delivery of the same input
        # overwrote the object since this process remembered it).
        expected = known[0]
    for _ in range(_MAX_ATTEMPTS):
        try:
            written = await gcs.write(
                bucket, name, payload, metadata=metadata, if_generation_match=expected
            )
        except PreconditionFailed:
            current = await gcs.info(bucket, name)
        else:
            if recent is not None:
                recent.put(uri, written.generation, ours)
            return StoredResult(uri, written=True)
        if current is None:
            expected = 0  # deleted in between
            continue
        theirs = rank(current.metadata)
        if recent is not None:
            recent.put(uri, current.generation, theirs)
        if theirs == ours and replacing_equal:
            # A concurrent delivery of an equal-ranked result won the race: it says the same.
            return StoredResult(uri, written=False)
        replacing_equal = theirs == ours
        if theirs > ours:
            logger.info(
                "kept %s: it outranks the new result",
                uri,
                extra={"kept": str(theirs), "offered": str(ours)},
            )
            record = await _keep_superseded_error(gcs, bucket, result, payload, metadata)
            return StoredResult(uri, written=False, superseded=True, error_record_uri=record)
        expected = current.generation
    raise TransientError(f"{uri} kept changing during {_MAX_ATTEMPTS} conditional writes")


async def _keep_superseded_error(
    gcs: GcsClient, bucket: str, result: InferenceResult, payload: bytes, metadata: dict[str, str]
) -> str | None:
    """Write an outranked *error* result where its caller finds it by request id.

    An ``ok`` result that loses changes nothing anyone needs to know; an error that
    loses (an unknown version for an object that has a result) would otherwise
    leave no trace on the Pub/Sub path. Written unconditionally: the name is unique
    to the request and input, so a rewrite is a redelivery saying the same.
    """
    if result.status is not Status.ERROR:
        return None
    name = superseded_error_object_name(result.request_id, result.source.uri)
    await gcs.write(bucket, name, payload, metadata=metadata)
    logger.info("kept an outranked error result at gs://%s/%s", bucket, name)
    return f"gs://{bucket}/{name}"
