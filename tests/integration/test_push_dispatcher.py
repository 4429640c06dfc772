"""The local push dispatcher against the real Pub/Sub emulator: concurrent delivery in
the push envelope, backoff and attempt counting on failure, dead-lettering with the
service's attributes after ``max_delivery_attempts``."""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from infra.local import emulators as _emulators
from infra.local.processes import free_port, port_open, start_process, stop_group, wait_until
from infra.local.push_dispatcher import Dispatcher, Route

pytestmark = pytest.mark.integration
PROJECT = "dispatcher-test"


class Endpoint:
    """A push endpoint that records envelopes, sleeps, and answers a fixed status."""

    def __init__(self, status: int, delay_s: float) -> None:
        self.status, self.delay_s = status, delay_s
        self.envelopes: list[dict] = []
        self.arrivals: list[float] = []  # time.monotonic() of each POST
        self.in_flight = self.peak = 0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with endpoint._lock:
                    endpoint.envelopes.append(body)
                    endpoint.arrivals.append(time.monotonic())
                    endpoint.in_flight += 1
                    endpoint.peak = max(endpoint.peak, endpoint.in_flight)
                time.sleep(endpoint.delay_s)
                with endpoint._lock:
                    endpoint.in_flight -= 1
                self.send_response(endpoint.status)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/projects/{PROJECT}/topics/t"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    process = start_process("pubsub", _emulators.pubsub_argv(port), tmp_path_factory.mktemp("ps"), dict(os.environ), Path.cwd())
    try:
        wait_until(lambda: port_open(port), 90, "the Pub/Sub emulator", process)
        saved = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = f"127.0.0.1:{port}"
        yield f"127.0.0.1:{port}"
        if saved is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = saved
    finally:
        stop_group(process.pid, grace_s=5)


def _setup(tag: str) -> tuple[str, str, str]:
    from google.cloud import pubsub_v1

    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, f"t-{tag}")
    dead = publisher.topic_path(PROJECT, f"dead-{tag}")
    for name in (topic, dead):
        publisher.create_topic(name=name)
    subscriber.create_subscription(name=subscriber.subscription_path(PROJECT, f"s-{tag}"), topic=topic)
    subscriber.create_subscription(name=subscriber.subscription_path(PROJECT, f"dead-{tag}"), topic=dead)
    return topic, f"s-{tag}", f"dead-{tag}"


def _publish(topic: str, count: int) -> set[bytes]:
    from google.cloud import pubsub_v1

    publisher = pubsub_v1.PublisherClient()
    bodies = {f"message-{i}".encode() for i in range(count)}
    for future in [publisher.publish(topic, body, origin="test") for body in bodies]:
        future.result(timeout=30)
    return bodies


def test_deliveries_run_concurrently_and_are_acknowledged(emulator: str) -> None:
    tag = uuid.uuid4().hex[:8]
    topic, sub, _ = _setup(tag)
    endpoint = Endpoint(204, delay_s=0.2)
    dispatcher = Dispatcher(PROJECT, f"dead-{tag}", [Route(sub, endpoint.url, 5, 1, 2)], concurrency=16)
    dispatcher.start()
    try:
        bodies = _publish(topic, 48)
        deadline = time.monotonic() + 30
        while len(endpoint.envelopes) < 48 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # acknowledged messages are not delivered again
    finally:
        dispatcher.stop()
        endpoint.server.shutdown()
    delivered = [base64.b64decode(e["message"]["data"]) for e in endpoint.envelopes]
    assert sorted(delivered) == sorted(bodies)  # each exactly once
    assert endpoint.peak > 4, endpoint.peak  # the emulator's own push keeps about two in flight
    first = endpoint.envelopes[0]
    assert first["deliveryAttempt"] == 1 and first["subscription"].endswith(f"/subscriptions/{sub}")
    assert first["message"]["attributes"] == {"origin": "test"} and first["message"]["messageId"]


def test_failed_deliveries_back_off_and_end_on_the_dead_letter_topic(emulator: str) -> None:
    from google.cloud import pubsub_v1

    tag = uuid.uuid4().hex[:8]
    topic, sub, dead_sub = _setup(tag)
    endpoint = Endpoint(500, delay_s=0.0)
    dispatcher = Dispatcher(PROJECT, f"dead-{tag}", [Route(sub, endpoint.url, 3, 1, 2)], concurrency=4)
    dispatcher.start()
    subscriber = pubsub_v1.SubscriberClient()
    dead: list = []
    try:
        started = time.monotonic()
        _publish(topic, 2)
        while len(dead) < 2 and time.monotonic() - started < 40:
            response = subscriber.pull(
                subscription=subscriber.subscription_path(PROJECT, dead_sub), max_messages=10, timeout=5
            )
            dead += [m.message for m in response.received_messages]
            if response.received_messages:
                subscriber.acknowledge(
                    subscription=subscriber.subscription_path(PROJECT, dead_sub),
                    ack_ids=[m.ack_id for m in response.received_messages],
                )
        elapsed = time.monotonic() - started
    finally:
        dispatcher.stop()
        endpoint.server.shutdown()
    assert len(dead) == 2
    assert all(m.attributes["CloudPubSubDeadLetterSourceSubscription"] == sub for m in dead)
    assert all(m.attributes["CloudPubSubDeadLetterSourceDeliveryCount"] == "3" for m in dead)
    assert all(m.attributes["origin"] == "test" for m in dead)
    attempts = sorted(e["deliveryAttempt"] for e in endpoint.envelopes)
    assert attempts == [1, 1, 2, 2, 3, 3]
    assert elapsed >= 1 + 2  # backoff of 1 s after the first failure, 2 s after the second


def test_a_9_mb_message_is_pulled_and_delivered_whole(emulator: str) -> None:
    """Pub/Sub allows 10 MB; gRPC's default receive limit (4 MB) must not stop the pull."""
    from google.cloud import pubsub_v1

    tag = uuid.uuid4().hex[:8]
    topic, sub, _ = _setup(tag)
    endpoint = Endpoint(204, delay_s=0.0)
    dispatcher = Dispatcher(PROJECT, f"dead-{tag}", [Route(sub, endpoint.url, 5, 1, 2)], concurrency=4)
    big = os.urandom(9 * 1024 * 1024)
    dispatcher.start()
    try:
        pubsub_v1.PublisherClient().publish(topic, big, origin="big").result(timeout=60)
        deadline = time.monotonic() + 60
        while not endpoint.envelopes and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        dispatcher.stop()
        endpoint.server.shutdown()
    [delivered] = endpoint.envelopes
    assert base64.b64decode(delivered["message"]["data"]) == big
    assert delivered["deliveryAttempt"] == 1


def test_a_held_message_is_never_handed_out_again_while_held(emulator: str) -> None:
    """A backoff longer than the ack deadline: the message stays leased until its release,
    so the second delivery starts only after the backoff, never alongside the first."""
    from google.cloud import pubsub_v1

    tag = uuid.uuid4().hex[:8]
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, f"t-{tag}")
    publisher.create_topic(name=topic)
    publisher.create_topic(name=publisher.topic_path(PROJECT, f"dead-{tag}"))
    # The emulator's shortest ack deadline, against a 15 s backoff.
    subscriber.create_subscription(
        name=subscriber.subscription_path(PROJECT, f"s-{tag}"), topic=topic, ack_deadline_seconds=10
    )
    endpoint = Endpoint(500, delay_s=0.0)
    dispatcher = Dispatcher(PROJECT, f"dead-{tag}", [Route(f"s-{tag}", endpoint.url, 2, 15, 15)], concurrency=4)
    dispatcher.start()
    try:
        started = time.monotonic()
        publisher.publish(topic, b"held").result(timeout=30)
        while len(endpoint.envelopes) < 2 and time.monotonic() - started < 45:
            time.sleep(0.1)
    finally:
        dispatcher.stop()
        endpoint.server.shutdown()
    assert [e["deliveryAttempt"] for e in endpoint.envelopes] == [1, 2]
    # Unleased, the emulator would hand out a copy at the 10 s ack deadline, mid-backoff.
    assert endpoint.arrivals[1] - endpoint.arrivals[0] >= 15


def test_a_filter_keeps_what_it_excludes_from_the_endpoint_and_a_bridge_republishes_the_rest(emulator: str) -> None:
    """fake-gcs-server's one topic split by bucket, as two notification configs would send it:
    the push route sees the images bucket, the bridge riding on its subscription carries the
    results bucket on, and the rest is acknowledged unseen."""
    from google.cloud import pubsub_v1

    from infra.local.push_dispatcher import Bridge
    from infra.local.subscription_filter import bucket_filter

    tag = uuid.uuid4().hex[:8]
    topic, sub, _ = _setup(tag)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    out = publisher.topic_path(PROJECT, f"out-{tag}")
    publisher.create_topic(name=out)
    subscriber.create_subscription(name=subscriber.subscription_path(PROJECT, f"out-{tag}"), topic=out)
    endpoint = Endpoint(204, delay_s=0.0)
    dispatcher = Dispatcher(
        PROJECT, f"dead-{tag}", [Route(sub, endpoint.url, 5, 1, 2)], concurrency=8,
        filters={sub: bucket_filter("images")},
        bridges=[Bridge(sub, f"out-{tag}", bucket_filter("results"))],
    )  # fmt: skip
    dispatcher.start()
    try:
        futures = [publisher.publish(topic, f"{bucket}-{i}".encode(), bucketId=bucket, objectId=str(i))
                   for i in range(10) for bucket in ("images", "results", "models")]  # fmt: skip
        for future in futures:
            future.result(timeout=30)
        republished: list[tuple[bytes, dict[str, str]]] = []
        deadline = time.monotonic() + 30
        while (len(endpoint.envelopes) < 10 or len(republished) < 10) and time.monotonic() < deadline:
            answer = subscriber.pull(subscription=subscriber.subscription_path(PROJECT, f"out-{tag}"),
                                     max_messages=50, timeout=5)  # fmt: skip
            republished += [(m.message.data, dict(m.message.attributes)) for m in answer.received_messages]
            if answer.received_messages:
                subscriber.acknowledge(subscription=subscriber.subscription_path(PROJECT, f"out-{tag}"),
                                       ack_ids=[m.ack_id for m in answer.received_messages])  # fmt: skip
        time.sleep(1.5)  # what was excluded was acknowledged, not redelivered
    finally:
        dispatcher.stop()
        endpoint.server.shutdown()
    delivered = sorted(base64.b64decode(e["message"]["data"]) for e in endpoint.envelopes)
    assert delivered == sorted(f"images-{i}".encode() for i in range(10))
    assert sorted(data for data, _ in republished) == sorted(f"results-{i}".encode() for i in range(10))
    assert all(attrs["bucketId"] == "results" and attrs["objectId"] for _, attrs in republished)
