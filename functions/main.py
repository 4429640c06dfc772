"""Cloud Function entry points (functions-framework, CloudEvent signature).

``on_request``: messages on the requests topic, ``{"uri": "gs://..."}`` or
``{"uris": [...]}`` with optional ``model``, ``version``, ``request_id``.
``on_upload``: Cloud Storage ``OBJECT_FINALIZE`` notifications delivered through
Pub/Sub, or Eventarc ``google.cloud.storage.object.v1.finalized`` events.
``on_bulk``: messages on the bulk topic (``triggerfish submit``, ``triggerfish dlq
replay``): request messages, or storage notifications replayed from the dead-letter
topic; every request they name is ``bulk`` work (batched after live work, shed first).

Raise to retry, log and return to drop: transient failures propagate (the
message is redelivered), permanent ones are recorded as error results.
"""

from __future__ import annotations

import base64
import binascii
import logging

import functions_framework
from cloudevents.http import CloudEvent

from functions._forward import forward, get_settings, record_failure
from shared.errors import ErrorReason, PermanentError
from shared.logging import configure_json_logging
from shared.messages import (
    EVENTARC_FINALIZED_TYPE,
    PUBSUB_PUBLISHED_TYPE,
    EntryPath,
    InferenceRequest,
    Priority,
    parse_gcs_notification,
    parse_request_message,
    parse_storage_event,
)

__all__ = ["on_bulk", "on_request", "on_upload"]

logger = logging.getLogger(__name__)


def _pubsub_message(cloud_event: CloudEvent) -> tuple[bytes, dict[str, str], str]:
    data = cloud_event.data
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, dict):
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE,
            f"event {cloud_event['id']} carries no Pub/Sub message object (data: {str(data)[:100]!r})",
        )
    message_id = str(message.get("messageId") or cloud_event["id"])
    try:
        data = base64.b64decode(message.get("data") or "", validate=True)
    except (binascii.Error, ValueError, TypeError) as err:
        raise PermanentError(
            ErrorReason.MALFORMED_MESSAGE, f"message {message_id} data is not base64: {err}"
        ) from err
    return data, dict(message.get("attributes") or {}), message_id


def _record_unparsable(err: PermanentError, message_id: str, entry_path: EntryPath) -> None:
    placeholder = InferenceRequest(
        uri=f"pubsub-message:{message_id}", request_id=message_id, entry_path=entry_path
    )
    record_failure(placeholder, err)


@functions_framework.cloud_event
def on_request(cloud_event: CloudEvent) -> None:
    """Handle one message published to the requests topic."""
    configure_json_logging()
    if cloud_event["type"] != PUBSUB_PUBLISHED_TYPE:
        # A trigger misconfiguration, not a bad message: retrying cannot fix it.
        logger.error("on_request ignores event type %r", cloud_event["type"])
        return
    message_id = cloud_event["id"]
    try:
        data, _attributes, message_id = _pubsub_message(cloud_event)
        requests = parse_request_message(data, message_id)
    except PermanentError as err:
        _record_unparsable(err, message_id, EntryPath.PUBSUB)
        return
    forward(requests)


@functions_framework.cloud_event
def on_upload(cloud_event: CloudEvent) -> None:
    """Handle one Cloud Storage finalize event (Pub/Sub notification or Eventarc)."""
    configure_json_logging()
    event_type = cloud_event["type"]
    message_id = cloud_event["id"]
    try:
        if event_type == EVENTARC_FINALIZED_TYPE:
            request = parse_storage_event(cloud_event.data or {})
        elif event_type == PUBSUB_PUBLISHED_TYPE:
            data, attributes, message_id = _pubsub_message(cloud_event)
            request = parse_gcs_notification(attributes, data)
        else:
            logger.error("on_upload ignores event type %r", event_type)
            return
    except PermanentError as err:
        _record_unparsable(err, message_id, EntryPath.UPLOAD)
        return
    if request is None:
        return  # not a finalize event: nothing to do
    if request.model is None:
        request = request.model_copy(update={"model": get_settings().default_model})
    forward([request])


@functions_framework.cloud_event
def on_bulk(cloud_event: CloudEvent) -> None:
    """Handle one message on the bulk topic: a request message or a replayed storage notification."""
    configure_json_logging()
    if cloud_event["type"] != PUBSUB_PUBLISHED_TYPE:
        logger.error("on_bulk ignores event type %r", cloud_event["type"])
        return
    message_id = cloud_event["id"]
    try:
        data, attributes, message_id = _pubsub_message(cloud_event)
        if "eventType" in attributes:  # a Cloud Storage notification, replayed as bulk work
            request = parse_gcs_notification(attributes, data)
            if request is None:
                return
            requests = [request.model_copy(update={"priority": Priority.BULK})]
        else:
            requests = parse_request_message(data, message_id, priority=Priority.BULK)
    except PermanentError as err:
        _record_unparsable(err, message_id, EntryPath.PUBSUB)
        return
    default_model = get_settings().default_model
    forward([r if r.model is not None else r.model_copy(update={"model": default_model}) for r in requests])
