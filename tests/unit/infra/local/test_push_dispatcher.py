"""The local push dispatcher's pure parts: routes, backoff, attempts and the push envelope.

Delivery runs against the real emulator in tests/integration/test_push_dispatcher.py; here
the lease of a held message runs against a recording stand-in for the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from google.pubsub_v1 import PubsubMessage

from infra.local.push_dispatcher import (
    _GRPC_OPTIONS,
    Attempts,
    Dispatcher,
    Route,
    _Acks,
    as_json,
    envelope,
)


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


# -- leases: a held message never outlives its ack deadline ------------------------------------


class _RecordingSubscriber:
    """The emulator's subscriber surface the delivery path uses, recording every call."""

    def __init__(self) -> None:
        self.deadlines: list[int] = []  # ack deadlines set, in order (0: released)

    async def modify_ack_deadline(self, subscription: str, ack_ids: list[str], ack_deadline_seconds: int,
                                  timeout: float) -> None:  # fmt: skip
        self.deadlines.append(ack_deadline_seconds)


class _Endpoint:
    """A push endpoint answering ``status`` after ``delay_s``."""

    def __init__(self, status: int = 500, delay_s: float = 0.0) -> None:
        self.status, self.delay_s = status, delay_s
        self.posts = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.posts += 1
        await request.read()
        await asyncio.sleep(self.delay_s)
        return web.Response(status=self.status)


async def _deliver_once(endpoint: _Endpoint, route: Route, ack_deadline_s: int) -> _RecordingSubscriber:
    app = web.Application()
    app.router.add_post("/push", endpoint.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    dispatcher = Dispatcher("p", "dead", [route], concurrency=1, emulator_host="127.0.0.1:1")
    subscriber = _RecordingSubscriber()
    dispatcher.subscriber = subscriber
    dispatcher._session = aiohttp.ClientSession()
    dispatcher._ack_deadlines["projects/p/subscriptions/s"] = ack_deadline_s
    message = as_json(PubsubMessage(data=b"{}", message_id="m-1", publish_time=datetime.now(UTC)))
    acks = _Acks(dispatcher, "projects/p/subscriptions/s")
    try:
        await dispatcher._deliver(
            dataclasses.replace(route, endpoint=f"http://127.0.0.1:{port}/push"),
            "projects/p/subscriptions/s", "ack-1", message, acks,
        )  # fmt: skip
    finally:
        await dispatcher._session.close()
        await runner.cleanup()
    return subscriber


def test_a_message_held_for_a_backoff_longer_than_its_ack_deadline_stays_leased_until_released() -> None:
    # Backoff 2 s against a 1 s ack deadline: without extensions the emulator would hand
    # out a second copy while this one is held.
    route = Route("s", "unused", max_attempts=5, min_backoff_s=2, max_backoff_s=2)

    subscriber = asyncio.run(_deliver_once(_Endpoint(), route, ack_deadline_s=1))

    *extensions, release = subscriber.deadlines
    assert release == 0  # released for redelivery at the end of the backoff
    assert extensions and set(extensions) == {1}  # extended to the ack deadline while held, never after


def test_a_delivery_is_cut_at_the_ack_deadline() -> None:
    route = Route("s", "unused", max_attempts=5, min_backoff_s=1, max_backoff_s=1)
    endpoint = _Endpoint(200, delay_s=3)  # a success, but after the 1 s ack deadline

    subscriber = asyncio.run(asyncio.wait_for(_deliver_once(endpoint, route, ack_deadline_s=1), 20))

    # Not acknowledged: the answer came too late, as Pub/Sub would have it; released once.
    assert endpoint.posts == 1
    assert subscriber.deadlines[-1] == 0 and subscriber.deadlines.count(0) == 1


def test_the_channel_lifts_grpcs_4_mb_receive_limit_for_10_mb_messages() -> None:
    options = dict(_GRPC_OPTIONS)
    limit = options["grpc.max_receive_message_length"]
    assert limit == -1 or limit >= 10 * 1024 * 1024
