"""infra/ops/dlq.py: reading dead letters, listing without consuming, replay that
acknowledges only what was republished."""

from __future__ import annotations

import base64
import dataclasses
import json
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path

import pytest
from google.pubsub_v1.types import PubsubMessage, PullResponse, ReceivedMessage

from infra.ops.dlq import (
    REPLAYED_FROM_ATTRIBUTE,
    DeadLetter,
    pull_dead_letters,
    release,
    replay,
)

DATA = Path(__file__).resolve().parents[3] / "data"


def recorded(message_id: str = "2", **attributes: str) -> ReceivedMessage:
    raw = json.loads((DATA / "pubsub_dead_letter_pull.json").read_text())
    message = raw["message"]
    return ReceivedMessage(
        ack_id=f"ack-{message_id}",
        message=PubsubMessage(
            data=base64.b64decode(message["data"]),
            attributes={**message["attributes"], **attributes},
            message_id=message_id,
            publish_time=datetime.fromisoformat(message["publish_time"]),
        ),
    )


def test_a_dead_letter_says_where_it_came_from() -> None:
    letter = DeadLetter.from_received(recorded())
    assert letter.source_subscription == "triggerfish-requests-push"
    assert (letter.source_project, letter.delivery_attempts) == ("triggerfish-local", 5)
    assert letter.attributes == {"origin": "triggerfish-cli"}  # the original attributes only
    assert letter.first_published == datetime(2026, 11, 29, 22, 29, 39, 548000, tzinfo=UTC)
    assert letter.dead_lettered == datetime(2026, 11, 29, 22, 29, 44, 693000, tzinfo=UTC)
    assert letter.age_s(datetime(2026, 11, 29, 22, 30, 39, 548000, tzinfo=UTC)) == 60.0
    assert json.loads(letter.body()) == {
        "uri": "gs://triggerfish-images/coffee.jpg",
        "model": "mobilenet_v2",
    }
    assert letter.body(10) == '{"uri": "…'
    assert letter.to_dict()["delivery_attempts"] == 5


def test_the_clouds_time_format_and_missing_attributes() -> None:
    cloud = DeadLetter.from_received(
        recorded(CloudPubSubDeadLetterSourceTopicPublishTime="2022-08-12T15:56:29.732+00:00")
    )
    assert cloud.first_published == datetime(2022, 8, 12, 15, 56, 29, 732000, tzinfo=UTC)
    bare = DeadLetter.from_received(
        ReceivedMessage(ack_id="a", message=PubsubMessage(data=b"\xff", message_id="9"))
    )
    assert (bare.source_subscription, bare.delivery_attempts, bare.first_published) == (
        None,
        None,
        None,
    )
    assert bare.body() == "\\xff"


class FakeSubscriber:
    def __init__(self, pages: list[list[ReceivedMessage]]) -> None:
        self.pages = pages
        self.pulls: list[dict] = []
        self.acked: list[str] = []
        self.released: list[str] = []

    def pull(self, **kwargs: object) -> PullResponse:
        self.pulls.append(kwargs)
        return PullResponse(received_messages=self.pages.pop(0) if self.pages else [])

    def acknowledge(self, subscription: str, ack_ids: list[str]) -> None:
        self.acked += ack_ids

    def modify_ack_deadline(
        self, subscription: str, ack_ids: list[str], ack_deadline_seconds: int
    ) -> None:
        assert ack_deadline_seconds == 0
        self.released += ack_ids


def test_pulling_leases_until_empty_or_max_and_releases_repeats() -> None:
    subscriber = FakeSubscriber(
        [[recorded("1"), recorded("2")], [recorded("2"), recorded("3")], []]
    )
    letters = pull_dead_letters(subscriber, "sub", max_messages=10)
    assert [x.message_id for x in letters] == ["1", "2", "3"]
    assert subscriber.released == ["ack-2"]  # the copy redelivered while the first was leased
    assert subscriber.pulls[0]["return_immediately"] is True
    assert [p["max_messages"] for p in subscriber.pulls] == [10, 8, 7]

    capped = FakeSubscriber([[recorded("1"), recorded("2")], [recorded("3")]])
    assert len(pull_dead_letters(capped, "sub", max_messages=2, wait_s=10)) == 2
    assert len(capped.pulls) == 1 and capped.pulls[0]["return_immediately"] is False

    letters = [DeadLetter.from_received(recorded("7"))]
    release(subscriber, "sub", letters)
    assert subscriber.released[-1] == "ack-7" and subscriber.acked == []


class FakePublisher:
    def __init__(self, refuse: set[bytes] = frozenset()) -> None:
        self.refuse = refuse
        self.published: list[tuple[str, bytes, dict]] = []

    def publish(self, topic: str, data: bytes, **attributes: str) -> Future:
        future: Future = Future()
        if data in self.refuse:
            future.set_exception(RuntimeError("permission denied"))
        else:
            self.published.append((topic, data, attributes))
            future.set_result(f"new-{len(self.published)}")
        return future


def test_replay_acknowledges_only_what_was_republished() -> None:
    good = DeadLetter.from_received(recorded("1"))
    refused = dataclasses.replace(DeadLetter.from_received(recorded("2")), data=b"refused")
    orphan = DeadLetter.from_received(
        ReceivedMessage(ack_id="ack-3", message=PubsubMessage(data=b"x", message_id="3"))
    )
    subscriber, publisher = FakeSubscriber([]), FakePublisher(refuse={b"refused"})

    def topic_for(letter: DeadLetter) -> str:
        if letter.source_subscription is None:
            raise LookupError("origin unknown")
        return f"projects/{letter.source_project}/topics/triggerfish-requests"

    report = replay(subscriber, publisher, "dlq", [good, refused, orphan], topic_for)

    assert report.replayed == {"1": "new-1"}
    assert set(report.failed) == {"2", "3"} and "permission denied" in report.failed["2"]
    assert subscriber.acked == ["ack-1"]
    assert sorted(subscriber.released) == ["ack-2", "ack-3"]
    topic, data, attributes = publisher.published[0]
    assert topic == "projects/triggerfish-local/topics/triggerfish-requests"
    assert data == good.data
    assert attributes == {"origin": "triggerfish-cli", REPLAYED_FROM_ATTRIBUTE: "1"}


@pytest.mark.parametrize("count", [0, 1, 2500])
def test_release_and_acknowledge_in_chunks(count: int) -> None:
    subscriber = FakeSubscriber([])
    letters = [DeadLetter.from_received(recorded(str(i))) for i in range(count)]
    release(subscriber, "sub", letters)
    assert len(subscriber.released) == count
