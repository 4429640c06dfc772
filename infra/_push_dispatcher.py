"""Push delivery for the local stack, as Cloud Pub/Sub does it.

The Pub/Sub emulator pushes to an endpoint with about two requests in flight,
and its redelivery timing ignores the subscription's retry policy. Cloud Pub/Sub
pushes with as much concurrency as the endpoint sustains, backs off failed
deliveries between the subscription's minimum and maximum backoff, and after
``max_delivery_attempts`` forwards the message to the dead-letter topic.

This process gives the local stack that behaviour: the stack's subscriptions are
pull subscriptions, and this dispatcher streams messages from each, POSTs them
to the function in the push envelope (``message``, ``subscription``,
``deliveryAttempt``), acknowledges on 2xx, and otherwise holds the message for
the retry policy's backoff before nacking it (while held it occupies one of the
route's ``--concurrency`` slots) or, on the last allowed
attempt, publishes the message to the dead-letter topic with the attributes the
service sets (``CloudPubSubDeadLetterSource*``) and then acknowledges it.

    python -m infra._push_dispatcher --project P --dead-letter-topic T \\
        --route SUBSCRIPTION=URL:MAX_ATTEMPTS:MIN_BACKOFF:MAX_BACKOFF ...
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass

import httpx

logger = logging.getLogger("infra.push_dispatcher")

# Messages whose attempts are remembered (a bounded map: ids of acked messages age out).
_REMEMBERED = 100_000


@dataclass(frozen=True, slots=True)
class Route:
    """One subscription delivered to one endpoint, with its retry policy."""

    subscription: str
    endpoint: str
    max_attempts: int
    min_backoff_s: int
    max_backoff_s: int

    @classmethod
    def parse(cls, text: str) -> Route:
        """``SUBSCRIPTION=URL:MAX_ATTEMPTS:MIN_BACKOFF:MAX_BACKOFF``."""
        try:
            subscription, rest = text.split("=", 1)
            endpoint, attempts, low, high = rest.rsplit(":", 3)
            return cls(subscription, endpoint, int(attempts), int(low), int(high))
        except ValueError as err:
            raise argparse.ArgumentTypeError(
                f"a route is SUBSCRIPTION=URL:MAX_ATTEMPTS:MIN_BACKOFF:MAX_BACKOFF, got {text!r}"
            ) from err

    def backoff_s(self, attempt: int) -> int:
        """Delay before redelivering after ``attempt`` failed (exponential, capped)."""
        return min(self.max_backoff_s, self.min_backoff_s * 2 ** max(0, attempt - 1))


class Attempts:
    """Delivery attempts per message id (thread-safe, bounded)."""

    def __init__(self) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def next(self, message_id: str) -> int:
        with self._lock:
            count = self._counts.pop(message_id, 0) + 1
            self._counts[message_id] = count
            while len(self._counts) > _REMEMBERED:
                self._counts.popitem(last=False)
            return count

    def forget(self, message_id: str) -> None:
        with self._lock:
            self._counts.pop(message_id, None)


def envelope(message, subscription_path: str, attempt: int) -> dict:  # noqa: ANN001 - pubsub Message
    """The JSON body Cloud Pub/Sub POSTs to a push endpoint."""
    return {
        "message": {
            "data": base64.b64encode(message.data).decode(),
            "attributes": dict(message.attributes),
            "messageId": message.message_id,
            "message_id": message.message_id,
            "publishTime": message.publish_time.isoformat().replace("+00:00", "Z"),
        },
        "subscription": subscription_path,
        "deliveryAttempt": attempt,
    }


class Dispatcher:
    """Streams every route's subscription and pushes each message to its endpoint."""

    def __init__(self, project: str, dead_letter_topic: str, routes: list[Route], concurrency: int) -> None:
        from google.cloud import pubsub_v1

        self._project = project
        self._routes = routes
        self._concurrency = concurrency
        self._subscriber = pubsub_v1.SubscriberClient()
        self._publisher = pubsub_v1.PublisherClient()
        self._dead_letter = self._publisher.topic_path(project, dead_letter_topic)
        self._http = httpx.Client(
            timeout=httpx.Timeout(600.0, connect=5.0),
            # Below gunicorn's 2 s keep-alive: a connection the function already closed
            # would reset the next POST on it, which is not retried.
            limits=httpx.Limits(max_connections=concurrency * len(routes), keepalive_expiry=1.0),
        )
        self._attempts = Attempts()
        self._futures: list = []

    def start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from google.cloud import pubsub_v1
        from google.cloud.pubsub_v1.subscriber.scheduler import ThreadScheduler

        for route in self._routes:
            path = self._subscriber.subscription_path(self._project, route.subscription)
            scheduler = ThreadScheduler(ThreadPoolExecutor(self._concurrency, thread_name_prefix=route.subscription))
            future = self._subscriber.subscribe(
                path,
                callback=lambda message, route=route, path=path: self._deliver(route, path, message),
                flow_control=pubsub_v1.types.FlowControl(max_messages=self._concurrency),
                scheduler=scheduler,
            )
            self._futures.append(future)
            logger.info("delivering %s to %s", path, route.endpoint)

    def stop(self) -> None:
        for future in self._futures:
            future.cancel()
        for future in self._futures:
            with contextlib.suppress(Exception):  # cancelled on purpose
                future.result(timeout=10)
        self._http.close()

    def _deliver(self, route: Route, subscription_path: str, message) -> None:  # noqa: ANN001
        attempt = self._attempts.next(message.message_id)
        try:
            response = self._http.post(
                route.endpoint,
                json=envelope(message, subscription_path, attempt),
                headers={"content-type": "application/json"},
            )
            ok = 200 <= response.status_code < 300 or response.status_code == 102
            detail = f"HTTP {response.status_code}"
        except httpx.HTTPError as err:
            ok, detail = False, repr(err)
        if ok:
            self._attempts.forget(message.message_id)
            message.ack()
            return
        if attempt >= route.max_attempts:
            self._dead_letter_message(route, subscription_path, message, attempt, detail)
            return
        delay = route.backoff_s(attempt)
        logger.warning(
            "delivery %d of message %s to %s failed (%s); redelivery in %ds",
            attempt, message.message_id, route.endpoint, detail, delay,
        )  # fmt: skip
        # The streaming-pull client keeps extending a message's lease until it is acked
        # or nacked, so a shorter ack deadline would never expire: hold the message for
        # the backoff, then nack it for immediate redelivery.
        timer = threading.Timer(delay, message.nack)
        timer.daemon = True
        timer.start()

    def _dead_letter_message(self, route: Route, subscription_path: str, message, attempt: int, detail: str) -> None:  # noqa: ANN001
        attributes = dict(message.attributes)
        attributes.update({
            "CloudPubSubDeadLetterSourceSubscription": route.subscription,
            "CloudPubSubDeadLetterSourceSubscriptionProject": self._project,
            "CloudPubSubDeadLetterSourceDeliveryCount": str(attempt),
            "CloudPubSubDeadLetterSourceTopicPublishTime": message.publish_time.isoformat(),
        })  # fmt: skip
        try:
            self._publisher.publish(self._dead_letter, message.data, **attributes).result(timeout=30)
        except Exception:  # noqa: BLE001 - keep the message; it is redelivered and tried again
            logger.exception("could not dead-letter message %s; it stays on %s", message.message_id, subscription_path)
            message.nack()
            return
        logger.error(
            "message %s dead-lettered after %d attempts (%s)", message.message_id, attempt, detail,
            extra={"subscription": route.subscription},
        )  # fmt: skip
        self._attempts.forget(message.message_id)
        message.ack()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--dead-letter-topic", required=True)
    parser.add_argument("--route", type=Route.parse, action="append", required=True)
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("TRIGGERFISH_PUSH_CONCURRENCY", "64")))
    args = parser.parse_args(argv)
    from shared.logging import configure_json_logging

    configure_json_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dispatcher = Dispatcher(args.project, args.dead_letter_topic, args.route, args.concurrency)
    dispatcher.start()
    stop.wait()
    dispatcher.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
