"""Writing result JSON: deterministic names, and never a stale result over a newer one."""

from __future__ import annotations

import json
import logging

from shared.results import InferenceResult, invalid_source_object_name, result_object_name
from shared.storage import get_storage_client, write_json
from shared.uris import GcsUri

logger = logging.getLogger(__name__)


def result_name(result: InferenceResult, source: GcsUri | None) -> str:
    """Where ``result`` belongs: by model/version/source, or under ``_invalid/`` without a source."""
    if source is None:
        return invalid_source_object_name(result.request_id, result.source.uri)
    return result_object_name(result.model.name, result.model.version, source)


# Object metadata on every result, so the stale-write check reads metadata, not the body.
GENERATION_METADATA_KEY = "triggerfish-source-generation"


def _stored_generation(bucket: str, name: str) -> int | None:
    blob = get_storage_client().bucket(bucket).get_blob(name)
    if blob is None:
        return None
    stored = (blob.metadata or {}).get(GENERATION_METADATA_KEY)
    if stored:
        return int(stored) if stored.isdigit() else None
    try:
        generation = json.loads(blob.download_as_bytes()).get("source", {}).get("generation")
    except (ValueError, AttributeError):
        return None  # unreadable old result: overwrite it
    return int(generation) if generation else None


def store_result(bucket: str, result: InferenceResult, source: GcsUri | None) -> str | None:
    """Write ``result``; return its ``gs://`` URI, or ``None`` when a newer one is already stored.

    Redeliveries rewrite the same object (same name, same content but timings).
    A late event for an *older* generation of the source object must not
    replace the result of the newer generation.
    """
    name = result_name(result, source)
    ours = result.source.generation
    if ours is not None:
        stored = _stored_generation(bucket, name)
        if stored is not None and stored > int(ours):
            logger.info(
                "kept gs://%s/%s: it holds generation %s, newer than %s", bucket, name, stored, ours
            )
            return None
    metadata = {GENERATION_METADATA_KEY: ours} if ours else None
    return write_json(bucket, name, result.to_json(), metadata)
