"""The local push dispatcher's pure parts: routes, backoff, attempts and the push envelope.

Delivery itself runs against the real emulator in tests/integration/test_push_dispatcher.py.
"""

from __future__ import annotations

import argparse
import base64
from datetime import UTC, datetime

import pytest
from google.pubsub_v1 import PubsubMessage

from infra.local.push_dispatcher import Attempts, Dispatcher, Route, as_json, envelope


def test_a_route_parses_its_retry_policy_and_backs_off_exponentially_up_to_the_cap() -> None:
    route = Route.parse("requests-push=http://127.0.0.1:8080/projects/p/topics/t:5:10:60")

    assert route == Route("requests-push", "http://127.0.0.1:8080/projects/p/topics/t", 5, 10, 60)
    assert [route.backoff_s(a) for a in (1, 2, 3, 4)] == [10, 20, 40, 60]


def test_a_malformed_route_says_what_a_route_looks_like() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="SUBSCRIPTION=URL:MAX_ATTEMPTS"):
        Route.parse("requests-push=http://127.0.0.1:8080/x:five:10:60")


def test_attempts_count_per_message_and_forget_the_oldest() -> None:
    attempts = Attempts(capacity=2)
    assert [attempts.next("a"), attempts.next("a"), attempts.next("b")] == [1, 2, 1]
    attempts.next("c")  # "a" is the least recently seen: forgotten
    assert attempts.next("a") == 1
    attempts.forget("c")
    assert attempts.next("c") == 1


def test_the_envelope_is_what_cloud_pub_sub_posts_to_a_push_endpoint() -> None:
    published = datetime(2026, 11, 30, 1, 2, 3, 456000, tzinfo=UTC)
    pulled = PubsubMessage(data=b'{"uri": "gs://b/cat.jpg"}', attributes={"origin": "test"}, message_id="42",
                           publish_time=published)  # fmt: skip

    body = envelope(as_json(pulled), "projects/p/subscriptions/s", 3)

    assert body == {
        "message": {
            "data": base64.b64encode(b'{"uri": "gs://b/cat.jpg"}').decode(),
            "attributes": {"origin": "test"},
            "messageId": "42",
            "message_id": "42",
            "publishTime": "2026-11-30T01:02:03.456000Z",
        },
        "subscription": "projects/p/subscriptions/s",
        "deliveryAttempt": 3,
    }


def test_the_dispatcher_needs_the_emulator_and_a_positive_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    with pytest.raises(ValueError, match="set PUBSUB_EMULATOR_HOST"):
        Dispatcher("p", "dead", [], concurrency=4)
    with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
        Dispatcher("p", "dead", [], concurrency=0, emulator_host="127.0.0.1:1")
