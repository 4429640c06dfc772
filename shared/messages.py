"""Wire messages and their normalization into one :class:`InferenceRequest`.

Every entry path (a JSON message on the requests topic, a GCS bucket
notification, an Eventarc storage CloudEvent, an HTTP call) ends up as a list
of ``InferenceRequest`` objects, one per source image.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.errors import ErrorReason, PermanentError

MAX_URIS_PER_MESSAGE = 100
# Message bodies nest two levels; anything much deeper is hostile (and would
# exhaust the parser's recursion), so it is refused before parsing.
MAX_JSON_DEPTH = 32
# HTTP header with the wall-clock time (epoch seconds) after which the caller no
# longer waits: Serve drops work for it instead of computing answers nobody reads.
DEADLINE_HEADER = "x-triggerfish-deadline"
# Object generations are int64 in Cloud Storage.
_GENERATION_PATTERN = r"^[0-9]{1,19}$"
_MAX_GENERATION = 2**63 - 1
FINALIZE_EVENT = "OBJECT_FINALIZE"
EVENTARC_FINALIZED_TYPE = "google.cloud.storage.object.v1.finalized"
PUBSUB_PUBLISHED_TYPE = "google.cloud.pubsub.topic.v1.messagePublished"

# Request ids that public HTTP callers choose are namespaced under this prefix, so
# they can never take the form of another entry path's ids (Pub/Sub message ids,
# ``<bucket>/<object>#<generation>`` upload ids) and re-label those results.
PUBLIC_REQUEST_ID_PREFIX = "http:"

_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Model and version names (public: the ingress checks query parameters against it).
NAME_PATTERN = _NAME_PATTERN
# Custom object metadata that picks the model for an uploaded image
# (e.g. `gcloud storage cp --custom-metadata=triggerfish-model=text_detector ...`).
MODEL_METADATA_KEY = "triggerfish-model"
VERSION_METADATA_KEY = "triggerfish-model-version"


class EntryPath(StrEnum):
    """How a request reached triggerfish."""

    PUBSUB = "pubsub"
    UPLOAD = "upload"
    HTTP = "http"


class Priority(StrEnum):
    """Which traffic class a request belongs to.

    ``live``: someone is waiting (uploads, HTTP calls, messages users publish).
    ``bulk``: backfills and replays; batched after live work, shed first, with a
    minimum share so that it never starves (:mod:`serve.model.batcher`).
    """

    LIVE = "live"
    BULK = "bulk"


class InferenceRequest(BaseModel):
    """One image to run through one model, whatever the entry path.

    ``uri`` is kept as given so that an invalid one can still be reported in an
    error result; it is parsed with :func:`shared.uris.parse_gcs_uri` where used.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(min_length=1, max_length=2048)
    generation: str | None = Field(default=None, pattern=_GENERATION_PATTERN)
    model: str | None = Field(default=None, pattern=_NAME_PATTERN)
    version: str | None = Field(default=None, pattern=_NAME_PATTERN)
    # Upload ids are `<bucket>/<object>#<generation>`: object names may be 1024 bytes long.
    request_id: str = Field(min_length=1, max_length=2048)
    entry_path: EntryPath
    priority: Priority = Priority.LIVE

    @model_validator(mode="after")
    def _generation_is_int64(self) -> Self:
        if self.generation is not None and int(self.generation) > _MAX_GENERATION:
            raise ValueError(f"generation {self.generation} is beyond int64")
        return self


class RequestMessage(BaseModel):
    """The JSON body published to the requests topic (and POSTed to ``/v1/infer``)."""

    model_config = ConfigDict(extra="forbid")

    uri: str | None = None
    uris: list[str] | None = Field(default=None, max_length=MAX_URIS_PER_MESSAGE)
    model: str | None = Field(default=None, pattern=_NAME_PATTERN)
    version: str | None = Field(default=None, pattern=_NAME_PATTERN)
    request_id: str | None = Field(default=None, min_length=1, max_length=200)
    # A message may ask to be handled as bulk work (a backfill of its own).
    priority: Priority | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Self:
        if (self.uri is None) == (self.uris is None):
            raise ValueError("give exactly one of 'uri' or 'uris'")
        if self.uris is not None and not self.uris:
            raise ValueError("'uris' is empty")
        return self

    def source_uris(self) -> list[str]:
        """The URIs named by the message, in order."""
        return [self.uri] if self.uri is not None else list(self.uris or [])

    def to_requests(
        self, default_request_id: str, entry_path: EntryPath, namespace: str = "",
        priority: Priority | None = None,
    ) -> list[InferenceRequest]:  # fmt: skip
        """Split into one :class:`InferenceRequest` per URI.

        Request ids are ``<id>`` for a single URI and ``<id>/<index>`` otherwise,
        so a redelivered message maps to the same ids. ``namespace`` prefixes an id
        the message sets itself (see :func:`public_requests`). ``priority``, where
        given, overrides the message's own (the bulk topic's messages are all bulk).
        """
        base = namespace + self.request_id if self.request_id else default_request_id
        uris = self.source_uris()
        return [
            InferenceRequest(
                uri=uri,
                model=self.model,
                version=self.version,
                request_id=base if len(uris) == 1 else f"{base}/{i}",
                entry_path=entry_path,
                priority=priority or self.priority or Priority.LIVE,
            )
            for i, uri in enumerate(uris)
        ]


def public_requests(message: RequestMessage, default_request_id: str) -> list[InferenceRequest]:
    """The requests of a message a public HTTP caller sent, its own request id namespaced.

    ``{"uri": ..., "request_id": "abc"}`` becomes request id ``http:abc``.
    """
    return message.to_requests(default_request_id, EntryPath.HTTP, PUBLIC_REQUEST_ID_PREFIX)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "message"
        parts.append(f"{loc}: {e['msg']}")
    return "; ".join(parts)


# A JSON string (skipped whole, in C) or one bracket: the depth scan's tokens.
_STRUCTURE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _depth(data: bytes | str, stop_above: int | None = None) -> int:
    """Deepest nesting of ``[``/``{`` outside strings (no recursion).

    Strings are skipped by the regular expression engine, so a body of base64 images
    costs a few tokens, not a Python step per character; the scan stops as soon as
    the depth passes ``stop_above``.
    """
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    depth = deepest = 0
    for match in _STRUCTURE.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_above is not None and deepest > stop_above:
                    return deepest
        elif token in "]}":
            depth -= 1
    return deepest


def parse_json_bounded(data: bytes | str) -> Any:
    """``json.loads`` that refuses documents nested deeper than :data:`MAX_JSON_DEPTH`.

    Raises:
        ValueError: not JSON, not UTF-8, or nested too deeply.
    """
    text = data if isinstance(data, str) else data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    # Counting brackets is cheap; the exact scan runs only when nesting is possible at all.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _depth(text, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return json.loads(text)


def parse_request_message(
    data: bytes, message_id: str, priority: Priority | None = None
) -> list[InferenceRequest]:
    """Parse a requests-topic message body (``priority`` overrides the message's own).

    Raises:
        PermanentError: ``malformed_message`` when the body is not the documented JSON.
    """
    try:
        payload = parse_json_bounded(data)
    except ValueError as err:
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE, f"message {message_id} is not JSON: {err}"
        ) from err
    if not isinstance(payload, dict):
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE,
            f"message {message_id} must be a JSON object, got {type(payload).__name__}",
        )
    try:
        message = RequestMessage.model_validate(payload)
        # to_requests validates each InferenceRequest too (e.g. an empty or overlong uri).
        return message.to_requests(message_id, EntryPath.PUBSUB, priority=priority)
    except ValidationError as err:
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE, f"message {message_id}: {_describe(err)}"
        ) from err


def _object_request(
    bucket: Any, name: Any, generation: Any, metadata: Any = None
) -> InferenceRequest:
    if not isinstance(bucket, str) or not isinstance(name, str) or not bucket or not name:
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE,
            f"storage event lacks bucket/name (bucket={bucket!r}, name={name!r})",
        )
    gen = str(generation) if generation not in (None, "") else None
    meta = metadata if isinstance(metadata, Mapping) else {}
    try:
        return InferenceRequest(
            uri=f"gs://{bucket}/{name}",
            generation=gen,
            model=meta.get(MODEL_METADATA_KEY) or None,
            version=meta.get(VERSION_METADATA_KEY) or None,
            request_id=f"{bucket}/{name}#{gen or 'latest'}",
            entry_path=EntryPath.UPLOAD,
        )
    except ValidationError as err:
        raise PermanentError(ErrorReason.MALFORMED_MESSAGE, _describe(err)) from err


def parse_gcs_notification(attributes: Mapping[str, str], data: bytes) -> InferenceRequest | None:
    """Parse a Cloud Storage Pub/Sub notification (``JSON_API_V1`` payload).

    Returns:
        The request, or ``None`` for event types other than ``OBJECT_FINALIZE``
        (deletes and metadata updates are not work).
    """
    event_type = attributes.get("eventType")
    if event_type is None:
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE, "notification has no 'eventType' attribute"
        )
    if event_type != FINALIZE_EVENT:
        return None
    resource: dict[str, Any] = {}
    if data:
        try:
            decoded = parse_json_bounded(data)
        except ValueError as err:
            raise PermanentError(
                ErrorReason.MALFORMED_MESSAGE, f"notification payload is not JSON: {err}"
            ) from err
        if isinstance(decoded, dict):
            resource = decoded
    return _object_request(
        attributes.get("bucketId", resource.get("bucket")),
        attributes.get("objectId", resource.get("name")),
        attributes.get("objectGeneration", resource.get("generation")),
        resource.get("metadata"),
    )


def parse_storage_event(data: Mapping[str, Any]) -> InferenceRequest:
    """Parse the data of an Eventarc ``google.cloud.storage.object.v1.finalized`` CloudEvent."""
    if not isinstance(data, Mapping):
        raise PermanentError(ErrorReason.MALFORMED_MESSAGE, "storage event data is not an object")
    return _object_request(
        data.get("bucket"), data.get("name"), data.get("generation"), data.get("metadata")
    )
