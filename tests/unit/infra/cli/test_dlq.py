"""infra/cli/dlq.py: ages, --from, and finding the topic a dead letter came from."""

from __future__ import annotations

import argparse
import dataclasses
from types import SimpleNamespace

import pytest
from google.api_core import exceptions as gexc

from infra.cli.dlq import _age, _selected, _TopicResolver
from infra.ops.dlq import DeadLetter
from infra.ops.target import cloud_target

LETTER = DeadLetter(
    message_id="1", ack_id="a", data=b"{}", attributes={},
    source_subscription="triggerfish-requests-push", source_project="acme-ml",
    delivery_attempts=5, first_published=None, dead_lettered=None,
)  # fmt: skip


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "?"),
        (-3, "0s"),
        (59.9, "59s"),
        (61, "1m01s"),
        (3600 * 5 + 120, "5h02m"),
        (86400 * 2 + 3600, "2d01h"),
    ],
)
def test_age(seconds, text) -> None:  # noqa: ANN001
    assert _age(seconds) == text


def test_from_matches_the_short_name_or_a_full_path() -> None:
    def chosen(source: str | None, letter: DeadLetter = LETTER) -> bool:
        return _selected(letter, argparse.Namespace(source=source))

    assert chosen(None) and chosen("triggerfish-requests-push")
    assert chosen("projects/acme-ml/subscriptions/triggerfish-requests-push")
    assert not chosen("triggerfish-uploads-push")
    assert not chosen("x", dataclasses.replace(LETTER, source_subscription=None))


class FakeSubscriber:
    def __init__(self, topics: dict[str, str]) -> None:
        self.topics, self.asked = topics, []

    def subscription_path(self, project: str, name: str) -> str:
        return f"projects/{project}/subscriptions/{name}"

    def get_subscription(self, subscription: str) -> SimpleNamespace:
        self.asked.append(subscription)
        if subscription not in self.topics:
            raise gexc.NotFound("gone")
        return SimpleNamespace(topic=self.topics[subscription])


class FakePublisher:
    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"


def resolver(topics: dict[str, str]) -> tuple[_TopicResolver, FakeSubscriber]:
    subscriber = FakeSubscriber(topics)
    target = cloud_target({}, "acme-ml", topic="triggerfish-requests", results_bucket="r")
    return _TopicResolver(target, subscriber, FakePublisher()), subscriber


def test_the_topic_is_the_source_subscriptions_asked_once() -> None:
    topic_for, subscriber = resolver(
        {
            "projects/acme-ml/subscriptions/triggerfish-requests-push": "projects/acme-ml/topics/renamed"
        }
    )
    assert topic_for(LETTER) == topic_for(LETTER) == "projects/acme-ml/topics/renamed"
    assert len(subscriber.asked) == 1
    full = dataclasses.replace(
        LETTER, source_subscription="projects/acme-ml/subscriptions/triggerfish-requests-push"
    )
    assert topic_for(full) == "projects/acme-ml/topics/renamed"


def test_a_deleted_subscription_falls_back_to_the_footprint() -> None:
    topic_for, _ = resolver({})
    assert topic_for(LETTER) == "projects/acme-ml/topics/triggerfish-requests"
    with pytest.raises(LookupError, match="'gone-push' not found and not in the footprint"):
        topic_for(dataclasses.replace(LETTER, source_subscription="gone-push"))
    with pytest.raises(LookupError, match="origin unknown"):
        topic_for(dataclasses.replace(LETTER, source_subscription=None))
