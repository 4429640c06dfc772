"""Dead letters: look at what Pub/Sub gave up on, and replay it after a fix.

Pub/Sub forwards a message to the dead-letter topic after the subscription's
``max_delivery_attempts`` failed deliveries, keeping its data and attributes
and adding four attributes (:data:`DEAD_LETTER_ATTRIBUTES`). These functions
work on the pull subscription of that topic:

* :func:`pull_dead_letters` leases messages without consuming them and
  :func:`release` hands them back (a zero acknowledgement deadline), so
  listing changes nothing;
* :func:`replay` republishes each message, with its original attributes, to
  the topic of the subscription it came from, and acknowledges it only once
  that publish succeeded; a failed publish releases the message instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_SUBSCRIPTION = "CloudPubSubDeadLetterSourceSubscription"
SOURCE_PROJECT = "CloudPubSubDeadLetterSourceSubscriptionProject"
DELIVERY_COUNT = "CloudPubSubDeadLetterSourceDeliveryCount"
SOURCE_PUBLISH_TIME = "CloudPubSubDeadLetterSourceTopicPublishTime"
DEAD_LETTER_ATTRIBUTES = (SOURCE_SUBSCRIPTION, SOURCE_PROJECT, DELIVERY_COUNT, SOURCE_PUBLISH_TIME)
# Set on a replayed message: the dead letter it came from, for tracing.
REPLAYED_FROM_ATTRIBUTE = "triggerfish-replayed-from"
# Acknowledge and modifyAckDeadline accept at most this many ack ids per call.
_ACK_CHUNK = 1000


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message on the dead-letter subscription, leased by this process.

    Attributes:
        attributes: The original message's attributes (the dead-letter ones removed).
        source_subscription: Short name of the subscription that gave up on it.
        delivery_attempts: How many times that subscription tried to deliver it.
        first_published: When the original message was published.
        dead_lettered: When it was forwarded to the dead-letter topic.
    """

    message_id: str
    ack_id: str
    data: bytes
    attributes: Mapping[str, str]
    source_subscription: str | None
    source_project: str | None
    delivery_attempts: int | None
    first_published: datetime | None
    dead_lettered: datetime | None

    @classmethod
    def from_received(cls, received: Any) -> DeadLetter:
        """From a ``google.pubsub_v1.ReceivedMessage``."""
        message = received.message
        attributes = dict(message.attributes)
        count = attributes.get(DELIVERY_COUNT, "")
        publish_time = message.publish_time
        return cls(
            message_id=message.message_id,
            ack_id=received.ack_id,
            data=bytes(message.data),
            attributes={k: v for k, v in attributes.items() if k not in DEAD_LETTER_ATTRIBUTES},
            source_subscription=attributes.get(SOURCE_SUBSCRIPTION) or None,
            source_project=attributes.get(SOURCE_PROJECT) or None,
            delivery_attempts=int(count) if count.isdigit() else None,
            first_published=_parse_time(attributes.get(SOURCE_PUBLISH_TIME)),
            dead_lettered=publish_time if isinstance(publish_time, datetime) else None,
        )

    def age_s(self, now: datetime | None = None) -> float | None:
        """Seconds since the original message was published."""
        start = self.first_published or self.dead_lettered
        if start is None:
            return None
        return ((now or datetime.now(UTC)) - start).total_seconds()

    def body(self, limit: int | None = None) -> str:
        """The data as text (``\\x`` escapes for bytes that are not UTF-8), cut at ``limit``."""
        text = self.data.decode("utf-8", errors="backslashreplace")
        return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"

    def to_dict(self, now: datetime | None = None) -> dict[str, Any]:
        age = self.age_s(now)
        return {
            "message_id": self.message_id,
            "source_subscription": self.source_subscription,
            "source_project": self.source_project,
            "delivery_attempts": self.delivery_attempts,
            "first_published": self.first_published.isoformat() if self.first_published else None,
            "dead_lettered": self.dead_lettered.isoformat() if self.dead_lettered else None,
            "age_s": round(age, 1) if age is not None else None,
            "attributes": dict(self.attributes),
            "body": self.body(),
        }


def pull_dead_letters(
    subscriber: Any,
    subscription: str,
    max_messages: int,
    seen: set[str] | None = None,
    wait_s: float = 0.0,
) -> list[DeadLetter]:
    """Lease up to ``max_messages`` dead letters (pull until one comes back empty).

    Messages stay leased until :func:`release` or acknowledgement, so one
    message is not returned twice; ``seen`` message ids are released at once
    (a message released earlier and delivered again). With ``wait_s`` > 0 a
    pull waits that long for messages (Pub/Sub may answer an immediate pull
    with nothing while messages exist); 0 asks for an immediate answer (the
    emulator answers those exactly, and waits out the timeout otherwise).
    """
    from google.api_core import exceptions as gexc

    letters: list[DeadLetter] = []
    seen = seen if seen is not None else set()
    while len(letters) < max_messages:
        try:
            response = subscriber.pull(
                subscription=subscription,
                max_messages=min(100, max_messages - len(letters)),
                return_immediately=wait_s <= 0,
                timeout=wait_s if wait_s > 0 else 30,
            )
        except gexc.DeadlineExceeded:
            break
        received = [DeadLetter.from_received(r) for r in response.received_messages]
        if not received:
            break
        fresh = [r for r in received if r.message_id not in seen]
        release(subscriber, subscription, [r for r in received if r.message_id in seen])
        if not fresh:
            break
        seen.update(r.message_id for r in fresh)
        letters += fresh
    return letters


def _chunks(ack_ids: Sequence[str]) -> Iterable[list[str]]:
    for start in range(0, len(ack_ids), _ACK_CHUNK):
        yield list(ack_ids[start : start + _ACK_CHUNK])


def release(subscriber: Any, subscription: str, letters: Sequence[DeadLetter]) -> None:
    """Hand leased messages back unconsumed (acknowledgement deadline 0)."""
    for chunk in _chunks([letter.ack_id for letter in letters]):
        subscriber.modify_ack_deadline(
            subscription=subscription, ack_ids=chunk, ack_deadline_seconds=0
        )


@dataclass
class ReplayReport:
    """What :func:`replay` did: republished message ids, and failures by dead-letter id."""

    replayed: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def replay(
    subscriber: Any,
    publisher: Any,
    subscription: str,
    letters: Sequence[DeadLetter],
    topic_for: Callable[[DeadLetter], str],
    timeout_s: float = 60.0,
) -> ReplayReport:
    """Republish ``letters`` to their original topics; acknowledge each after its publish.

    ``topic_for`` maps a dead letter to the full path of the topic to publish
    to; when it raises, that letter is released and reported as failed.
    """
    report = ReplayReport()
    sent = []
    for letter in letters:
        try:
            topic = topic_for(letter)
        except Exception as err:  # noqa: BLE001 - reported per message
            report.failed[letter.message_id] = str(err)
            continue
        attributes = {**letter.attributes, REPLAYED_FROM_ATTRIBUTE: letter.message_id}
        sent.append((letter, publisher.publish(topic, letter.data, **attributes)))
    done: list[DeadLetter] = []
    for letter, future in sent:
        try:
            report.replayed[letter.message_id] = str(future.result(timeout=timeout_s))
            done.append(letter)
        except Exception as err:  # noqa: BLE001 - reported per message, released below
            report.failed[letter.message_id] = f"publish failed: {err}"
    for chunk in _chunks([letter.ack_id for letter in done]):
        subscriber.acknowledge(subscription=subscription, ack_ids=chunk)
    release(subscriber, subscription, [x for x in letters if x.message_id in report.failed])
    return report
