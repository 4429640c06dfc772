"""Push delivery for the local stack, as Cloud Pub/Sub does it.

The Pub/Sub emulator pushes to an endpoint with about two requests in flight,
and its redelivery timing ignores the subscription's retry policy. Cloud Pub/Sub
pushes with as much concurrency as the endpoint sustains, backs off failed
deliveries between the subscription's minimum and maximum backoff, and after
``max_delivery_attempts`` forwards the message to the dead-letter topic.

This process gives the local stack that behaviour: the stack's subscriptions are
pull subscriptions, and this dispatcher pulls from each (unary gRPC pulls, long
polling, never more messages than free delivery slots), POSTs them to
the function in the push envelope (``message``, ``subscription``,
``deliveryAttempt``), and acknowledges on 2xx (acknowledgements are sent in
batches). A failed delivery is held for the retry policy's backoff (while held
it occupies one of the route's ``--concurrency`` slots) and then released for
immediate redelivery; on the last allowed attempt the message is published to
the dead-letter topic with the attributes the service sets
(``CloudPubSubDeadLetterSource*``) and then acknowledged.

Like a push endpoint's, a delivery's time is bounded by the subscription's ack
deadline (read from the emulator at start). The message stays leased for as long
as this process holds it, in flight or backing off: its ack deadline is extended
every third of the deadline, and the extending stops before the message is
released, so the emulator never hands out a second copy of a message a
delivery still holds, and copies never run concurrently.

Messages up to Pub/Sub's 10 MB are pulled: gRPC's default 4 MB receive limit is
lifted on the channel, as Google's Pub/Sub client library does.

A subscription may have a filter (``--filter``): the emulator stores filters but
does not apply them, so this process acknowledges what a filter excludes unseen, as
Cloud Pub/Sub does (:mod:`infra.local.subscription_filter`). A bridge (``--bridge``)
republishes messages, data and attributes unchanged, to another topic and
acknowledges each once published. On a push route's subscription it takes what the
route's filter excludes and its own filter matches: so one subscription on the
uploads topic feeds the upload function with the images bucket's notifications and
the results topic with the results bucket's, standing in for the two Cloud Storage
notification configs fake-gcs-server cannot have, at one pull per notification. On a
subscription of its own (no route), a bridge republishes everything its filter keeps.

One asyncio loop does all of it: delivering a message costs a few hundred
microseconds of CPU, which on a small machine is CPU the stack it feeds keeps.

    python -m infra.local.push_dispatcher --project P --dead-letter-topic T \\
        --route SUBSCRIPTION=URL:MAX_ATTEMPTS:MIN_BACKOFF:MAX_BACKOFF ... \\
        [--filter SUBSCRIPTION='attributes.KEY = "VALUE"' ...] [--bridge SUBSCRIPTION=TOPIC ...]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import os
import signal
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from google.api_core import exceptions as api_exceptions

from infra.local.subscription_filter import AttributeFilter

logger = logging.getLogger("infra.push_dispatcher")

# Messages whose attempts are remembered (a bounded map: ids of acked messages age out).
_REMEMBERED = 100_000
# How long acknowledgements gather before one request sends them all.
_ACK_BATCH_S = 0.02
# Pub/Sub's default ack deadline, used where a subscription's cannot be read.
_DEFAULT_ACK_DEADLINE_S = 10
# No limit on what one pull answer may carry: it holds up to --concurrency messages of
# up to 10 MB each (Pub/Sub's limit); gRPC's default is 4 MB. -1 as in google-cloud-pubsub.
_GRPC_OPTIONS = (("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1))
# Below gunicorn's 2 s keep-alive: a connection the function already closed would
# fail the next POST on it.
_KEEPALIVE_S = 1.0
# A pull waits this long for messages before it is sent again.
_PULL_WAIT_S = 60.0
# Calls to the emulator other than pulls.
_CALL_TIMEOUT_S = 30.0
# Bridged messages are published in batches: up to this many, after at most this long.
_PUBLISH_BATCH = 100
_PUBLISH_LINGER_S = 0.005
# What the emulator may answer when it is away or busy: the call is tried again later.
_EMULATOR_ERRORS = (api_exceptions.GoogleAPIError, TimeoutError, OSError)


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


@dataclass(frozen=True, slots=True)
class Bridge:
    """Messages of ``subscription`` republished, unchanged, to ``topic``: those ``only`` matches
    (every one without it); on a push route's subscription, only those its route's filter excludes."""

    subscription: str
    topic: str
    only: AttributeFilter | None = None

    @classmethod
    def parse(cls, text: str) -> Bridge:
        """``SUBSCRIPTION=TOPIC`` or ``SUBSCRIPTION=TOPIC;FILTER``."""
        head, _, expression = text.partition(";")
        subscription, _, topic = head.partition("=")
        if not subscription or not topic or "/" in topic:
            raise argparse.ArgumentTypeError(f"a bridge is SUBSCRIPTION=TOPIC[;FILTER], got {text!r}")
        try:
            only = AttributeFilter.parse(expression) if expression.strip() else None
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
        return cls(subscription, topic, only)

    def takes(self, attributes: Mapping[str, str]) -> bool:
        return self.only is None or self.only.matches(attributes)


def parse_filter(text: str) -> tuple[str, AttributeFilter]:
    """``SUBSCRIPTION=FILTER``: the filter of one subscription, in Pub/Sub's syntax."""
    subscription, _, expression = text.partition("=")
    try:
        if not subscription:
            raise ValueError(f"a filter is SUBSCRIPTION=FILTER, got {text!r}")
        return subscription, AttributeFilter.parse(expression)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


class Attempts:
    """Delivery attempts per message id (bounded: the oldest ids are forgotten)."""

    def __init__(self, capacity: int = _REMEMBERED) -> None:
        self._counts: OrderedDict[str, int] = OrderedDict()
        self._capacity = capacity

    def next(self, message_id: str) -> int:
        count = self._counts.pop(message_id, 0) + 1
        self._counts[message_id] = count
        while len(self._counts) > self._capacity:
            self._counts.popitem(last=False)
        return count

    def forget(self, message_id: str) -> None:
        self._counts.pop(message_id, None)


def as_json(message: Any) -> dict[str, Any]:  # noqa: ANN401 - a pubsub_v1 PubsubMessage
    """A pulled message in the REST API's JSON form (data in base64)."""
    return {
        "data": base64.b64encode(message.data).decode(),
        "attributes": dict(message.attributes),
        "messageId": message.message_id,
        "publishTime": message.publish_time.isoformat().replace("+00:00", "Z"),
    }


def envelope(message: dict[str, Any], subscription_path: str, attempt: int) -> dict[str, Any]:
    """The JSON body Cloud Pub/Sub POSTs to a push endpoint, for a message in :func:`as_json` form."""
    return {
        "message": {
            "data": message.get("data", ""),
            "attributes": message.get("attributes", {}),
            "messageId": message["messageId"],
            "message_id": message["messageId"],
            "publishTime": message["publishTime"],
        },
        "subscription": subscription_path,
        "deliveryAttempt": attempt,
    }


class _Acks:
    """Acknowledgements of one subscription, sent in batches."""

    def __init__(self, dispatcher: Dispatcher, subscription_path: str) -> None:
        self._dispatcher = dispatcher
        self._path = subscription_path
        self._pending: list[str] = []
        self._flush: asyncio.Task[None] | None = None

    def add(self, ack_id: str) -> None:
        self._pending.append(ack_id)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send_after(_ACK_BATCH_S))

    async def _send_after(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await self.send()

    async def send(self) -> None:
        ack_ids, self._pending = self._pending, []
        if not ack_ids:
            return
        try:
            await self._dispatcher.subscriber.acknowledge(
                subscription=self._path, ack_ids=ack_ids, timeout=_CALL_TIMEOUT_S
            )
        except _EMULATOR_ERRORS as err:
            # Not lost: unacknowledged messages are delivered again after their ack deadline.
            logger.warning("could not acknowledge %d messages on %s: %r", len(ack_ids), self._path, err)


class Dispatcher:
    """Pulls every route's subscription and pushes each message to its endpoint.

    Runs its own asyncio loop in a background thread between :meth:`start` and
    :meth:`stop`. ``emulator_host`` defaults to ``PUBSUB_EMULATOR_HOST``.
    """

    def __init__(
        self,
        project: str,
        dead_letter_topic: str,
        routes: list[Route],
        concurrency: int,
        emulator_host: str | None = None,
        filters: Mapping[str, AttributeFilter] | None = None,
        bridges: list[Bridge] | None = None,
    ) -> None:
        host = emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST", "")
        if not host:
            raise ValueError("the push dispatcher needs the Pub/Sub emulator: set PUBSUB_EMULATOR_HOST")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency!r}")
        self._host = host
        self._project = project
        self._dead_letter = f"projects/{project}/topics/{dead_letter_topic}"
        self._routes = routes
        self._bridges = bridges or []
        # Subscription short name -> its filter; a subscription without one gets everything.
        self._filters = dict(filters or {})
        self._concurrency = concurrency
        self._attempts = Attempts()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._session: aiohttp.ClientSession | None = None
        self.subscriber: Any = None
        self._publisher: Any = None
        # Bridged messages waiting to be published, per topic, and the publishes in flight.
        self._outgoing: dict[str, list[tuple[dict[str, Any], asyncio.Future[None]]]] = {}
        self._flushes: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._acks: dict[str, _Acks] = {}
        # Per subscription path: its ack deadline, which bounds a delivery and paces its lease.
        self._ack_deadlines: dict[str, int] = {}

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=30)
        self._thread = None

    async def _run(self) -> None:
        import grpc
        from google.pubsub_v1.services.publisher.async_client import PublisherAsyncClient
        from google.pubsub_v1.services.publisher.transports.grpc_asyncio import (
            PublisherGrpcAsyncIOTransport,
        )
        from google.pubsub_v1.services.subscriber.async_client import SubscriberAsyncClient
        from google.pubsub_v1.services.subscriber.transports.grpc_asyncio import (
            SubscriberGrpcAsyncIOTransport,
        )

        self._stopping = asyncio.Event()
        # The emulator speaks plain gRPC; its REST gateway costs it far more CPU per message.
        channel = grpc.aio.insecure_channel(self._host, options=_GRPC_OPTIONS)
        self.subscriber = SubscriberAsyncClient(transport=SubscriberGrpcAsyncIOTransport(channel=channel))
        self._publisher = PublisherAsyncClient(transport=PublisherGrpcAsyncIOTransport(channel=channel))
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
        # No netrc or proxy lookups per request.
        self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        deliveries: set[asyncio.Task[None]] = set()
        for route in self._routes:
            path = self._subscription_path(route)
            self._ack_deadlines[path] = await self._read_ack_deadline(path)
            logger.info("delivering %s to %s (ack deadline %d s)", path, route.endpoint, self._ack_deadlines[path])
        routed = {route.subscription for route in self._routes}
        for bridge in self._bridges:
            logger.info("republishing %s to %s (%s)", self._subscription_path(bridge), bridge.topic, bridge.only)
        # A bridge on a route's subscription rides on the route's pulls; others pull for themselves.
        own = [bridge for bridge in self._bridges if bridge.subscription not in routed]
        pumps = [asyncio.create_task(self._pump(route, deliveries)) for route in [*self._routes, *own]]
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            if deliveries:  # let what is being delivered finish (or be redelivered later)
                await asyncio.wait(deliveries, timeout=10)
            await asyncio.gather(*(acks.send() for acks in self._acks.values()))
            await self._session.close()
            await channel.close()

    def _subscription_path(self, route: Route | Bridge) -> str:
        return f"projects/{self._project}/subscriptions/{route.subscription}"

    async def _read_ack_deadline(self, path: str) -> int:
        try:
            subscription = await self.subscriber.get_subscription(subscription=path, timeout=_CALL_TIMEOUT_S)
        except _EMULATOR_ERRORS as err:
            logger.warning("could not read the ack deadline of %s (%r); using %d s", path, err, _DEFAULT_ACK_DEADLINE_S)
            return _DEFAULT_ACK_DEADLINE_S
        return int(subscription.ack_deadline_seconds) or _DEFAULT_ACK_DEADLINE_S

    # -- delivery -----------------------------------------------------------------------------
    async def _pump(self, route: Route | Bridge, deliveries: set[asyncio.Task[None]]) -> None:
        """Pull as many messages as there are free slots, deliver (or republish) each, repeat."""
        path = self._subscription_path(route)
        wanted = self._filters.get(route.subscription)
        if isinstance(route, Bridge) and route.only is not None:
            wanted = route.only
        # What this route's filter excludes, these bridges may take.
        riders = [b for b in self._bridges if isinstance(route, Route) and b.subscription == route.subscription]
        acks = self._acks.setdefault(path, _Acks(self, path))
        slots = asyncio.Semaphore(self._concurrency)
        while True:
            await slots.acquire()
            free = 1
            while not slots.locked() and free < self._concurrency:
                await slots.acquire()
                free += 1
            try:
                # Long polling: the emulator answers as soon as messages are there.
                answer = await self.subscriber.pull(
                    subscription=path, max_messages=free, retry=None, timeout=_PULL_WAIT_S
                )
                received = [(m.ack_id, as_json(m.message)) for m in answer.received_messages]
            except api_exceptions.DeadlineExceeded:
                received = []
            except Exception as err:  # noqa: BLE001 - the pump must outlive any one pull
                # Messages a failed pull took are delivered again after their ack deadline.
                logger.warning("pulling %s failed: %r; trying again in 1 s", path, err)
                received = []
                await asyncio.sleep(1.0)
            work_items: list[tuple[Route | Bridge, str, dict[str, Any]]] = []
            for ack_id, message in received:
                attributes = message.get("attributes", {})
                if wanted is None or wanted.matches(attributes):
                    work_items.append((route, ack_id, message))
                    continue
                rider = next((b for b in riders if b.takes(attributes)), None)
                if rider is not None:
                    work_items.append((rider, ack_id, message))
                else:
                    acks.add(ack_id)  # excluded by the filter: acknowledged unseen
            for _ in range(free - len(work_items)):
                slots.release()
            for target, ack_id, message in work_items:
                if isinstance(target, Bridge):
                    work = self._republish(target, path, ack_id, message, acks)
                else:
                    work = self._deliver(target, path, ack_id, message, acks)
                task = asyncio.create_task(work)
                deliveries.add(task)
                task.add_done_callback(lambda t: (deliveries.discard(t), slots.release()))

    async def _deliver(self, route: Route, path: str, ack_id: str, message: dict[str, Any], acks: _Acks) -> None:
        ack_deadline = self._ack_deadlines.get(path, _DEFAULT_ACK_DEADLINE_S)
        lease = _Lease(self, path, ack_id, ack_deadline)
        try:
            await self._attempt(route, path, ack_id, message, acks, lease, ack_deadline)
        finally:
            await lease.end()

    async def _attempt(
        self, route: Route, path: str, ack_id: str, message: dict[str, Any], acks: _Acks, lease: _Lease,
        ack_deadline: int,
    ) -> None:  # fmt: skip
        assert self._session is not None
        attempt = self._attempts.next(message["messageId"])
        try:
            async with self._session.post(
                route.endpoint,
                json=envelope(message, path, attempt),
                # A push waits for its endpoint as long as the ack deadline, no longer.
                timeout=aiohttp.ClientTimeout(total=ack_deadline, sock_connect=5),
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300 or response.status == 102
                detail = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as err:
            ok, detail = False, repr(err)
        if ok:
            self._attempts.forget(message["messageId"])
            acks.add(ack_id)
            return
        if attempt >= route.max_attempts:
            await lease.end()  # dead-lettering may release the message
            await self._dead_letter_message(route, path, message, ack_id, attempt, detail, acks)
            return
        delay = route.backoff_s(attempt)
        logger.warning(
            "delivery %d of message %s to %s failed (%s); redelivery in %ds",
            attempt, message["messageId"], route.endpoint, detail, delay,
        )  # fmt: skip
        # Held for the backoff (still leased), then released: the emulator hands a released
        # message to the waiting pull at once, while one whose ack deadline is set to the
        # backoff comes back late or, under load, not until much later.
        await asyncio.sleep(delay)
        await lease.end()  # no extension may land after the release
        await self._redeliver_after(path, ack_id, 0)

    async def _republish(self, bridge: Bridge, path: str, ack_id: str, message: dict[str, Any], acks: _Acks) -> None:
        """Publish the message, data and attributes unchanged, to the bridge's topic; then acknowledge."""
        outgoing = {"data": base64.b64decode(message.get("data", "")), "attributes": message.get("attributes", {})}
        try:
            await self._batched_publish(bridge.topic, outgoing)
        except _EMULATOR_ERRORS as err:
            # Kept: released after a pause and republished then (at least once, like the service).
            logger.warning("could not republish message %s to %s: %r", message["messageId"], bridge.topic, err)
            await asyncio.sleep(1.0)
            await self._redeliver_after(path, ack_id, 0)
            return
        acks.add(ack_id)

    async def _batched_publish(self, topic: str, message: dict[str, Any]) -> None:
        """Publish ``message`` in one call with whatever else arrives for ``topic`` meanwhile.

        Every result's notification passes here on the local stack: one publish call per
        batch instead of per message saves the emulator most of the cost of each.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        batch = self._outgoing.setdefault(topic, [])
        batch.append((message, done))
        if len(batch) == 1:
            asyncio.get_running_loop().call_later(_PUBLISH_LINGER_S, self._flush_soon, topic)
        if len(batch) >= _PUBLISH_BATCH:
            self._flush_soon(topic)
        await done

    def _flush_soon(self, topic: str) -> None:
        batch = self._outgoing.pop(topic, [])
        if batch:
            task = asyncio.get_running_loop().create_task(self._flush(topic, batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, topic: str, batch: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        try:
            await self._publisher.publish(
                topic=f"projects/{self._project}/topics/{topic}",
                messages=[message for message, _ in batch],
                timeout=_CALL_TIMEOUT_S,
            )
        except Exception as err:  # noqa: BLE001 - every message of the batch learns of it
            for _, done in batch:
                if not done.done():
                    done.set_exception(err)
        else:
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    async def _redeliver_after(self, path: str, ack_id: str, delay_s: int) -> None:
        """The message's ack deadline becomes ``delay_s`` (0: a nack): then the emulator delivers it again."""
        try:
            await self.subscriber.modify_ack_deadline(
                subscription=path, ack_ids=[ack_id], ack_deadline_seconds=delay_s, timeout=_CALL_TIMEOUT_S
            )
        except _EMULATOR_ERRORS as err:
            logger.warning("could not set the backoff of %s: %r; redelivered after its ack deadline", ack_id, err)

    async def _dead_letter_message(
        self, route: Route, path: str, message: dict[str, Any], ack_id: str, attempt: int, detail: str, acks: _Acks
    ) -> None:
        attributes = dict(message.get("attributes", {}))
        attributes.update({
            "CloudPubSubDeadLetterSourceSubscription": route.subscription,
            "CloudPubSubDeadLetterSourceSubscriptionProject": self._project,
            "CloudPubSubDeadLetterSourceDeliveryCount": str(attempt),
            "CloudPubSubDeadLetterSourceTopicPublishTime": message["publishTime"],
        })  # fmt: skip
        try:
            await self._publisher.publish(
                topic=self._dead_letter,
                messages=[{"data": base64.b64decode(message.get("data", "")), "attributes": attributes}],
                timeout=_CALL_TIMEOUT_S,
            )
        except _EMULATOR_ERRORS:
            # Keep the message: it is delivered again, and dead-lettering is tried again then.
            logger.exception("could not dead-letter message %s; it stays on %s", message["messageId"], path)
            await self._redeliver_after(path, ack_id, 0)
            return
        logger.error(
            "message %s dead-lettered after %d attempts (%s)", message["messageId"], attempt, detail,
            extra={"subscription": route.subscription},
        )  # fmt: skip
        self._attempts.forget(message["messageId"])
        acks.add(ack_id)


class _Lease:
    """Keeps one held message's ack deadline from running out until :meth:`end`.

    The first extension comes a third of the deadline after the pull, then one every
    third: a slow emulator call still lands well before the deadline passes.
    """

    def __init__(self, dispatcher: Dispatcher, path: str, ack_id: str, ack_deadline_s: int) -> None:
        self._dispatcher = dispatcher
        self._path = path
        self._ack_id = ack_id
        self._deadline_s = ack_deadline_s
        self._ended = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._keep())

    async def _keep(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._ended.wait(), self._deadline_s / 3)
                return
            except TimeoutError:
                pass
            try:
                await self._dispatcher.subscriber.modify_ack_deadline(
                    subscription=self._path, ack_ids=[self._ack_id], ack_deadline_seconds=self._deadline_s,
                    timeout=min(_CALL_TIMEOUT_S, self._deadline_s / 3),
                )  # fmt: skip
            except _EMULATOR_ERRORS as err:
                logger.warning("could not extend the ack deadline of %s: %r", self._ack_id, err)

    async def end(self) -> None:
        """Stop extending; returns once no extension is under way (so none lands after a release)."""
        self._ended.set()
        await asyncio.gather(self._task, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", required=True)
    parser.add_argument("--dead-letter-topic", required=True)
    parser.add_argument("--route", type=Route.parse, action="append", required=True)
    parser.add_argument("--filter", type=parse_filter, action="append", default=[],
                        help="SUBSCRIPTION=FILTER: what the subscription delivers (the emulator ignores filters)")
    parser.add_argument("--bridge", type=Bridge.parse, action="append", default=[],
                        help="SUBSCRIPTION=TOPIC[;FILTER]: republish the subscription's messages (those FILTER "
                             "keeps; on a route's subscription, those its filter excludes) to TOPIC")
    parser.add_argument("--concurrency", type=int, default=int(os.environ.get("TRIGGERFISH_PUSH_CONCURRENCY", "64")))
    args = parser.parse_args(argv)
    from shared.logging import configure_json_logging

    configure_json_logging()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    dispatcher = Dispatcher(
        args.project, args.dead_letter_topic, args.route, args.concurrency,
        filters=dict(args.filter), bridges=args.bridge,
    )  # fmt: skip
    dispatcher.start()
    stop.wait()
    with contextlib.suppress(Exception):
        dispatcher.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
