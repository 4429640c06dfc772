"""``triggerfish dlq list | replay``: the dead-letter subscription of the local stack or a project."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime

from rich.console import Console
from rich.table import Table

from infra.ops.dlq import DeadLetter, ReplayReport, pull_dead_letters, release, replay
from infra.ops.target import Target, resolve_target

_PAGE = 100


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _selected(letter: DeadLetter, args: argparse.Namespace) -> bool:
    """``--from``: only dead letters of that source subscription (short name or full path)."""
    if not args.source:
        return True
    return (letter.source_subscription or "").rsplit("/", 1)[-1] == args.source.rsplit("/", 1)[-1]


def _wait_s(target: Target) -> float:
    return 0.0 if target.local else 10.0


def _subscription_path(target: Target, subscriber, args: argparse.Namespace) -> str:  # noqa: ANN001
    return subscriber.subscription_path(
        target.project, args.subscription or target.dead_letter_subscription
    )


def cmd_dlq_list(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    subscriber = target.subscriber_client()
    path = _subscription_path(target, subscriber, args)
    leased = pull_dead_letters(subscriber, path, args.max, wait_s=_wait_s(target))
    letters = [x for x in leased if _selected(x, args)]
    try:
        now = datetime.now(UTC)
        if args.json:
            print(json.dumps({"subscription": path, "messages": [x.to_dict(now) for x in letters]}))
            return 0
        table = Table(
            title=f"{path}: {len(letters)} message(s)"
            + (f" from {args.source}" if args.source else "")
            + (" (--max reached)" if len(leased) >= args.max else "")
        )
        for column in ("message id", "from subscription", "attempts", "age", "body"):
            table.add_column(column, overflow="fold" if column == "body" else "ellipsis")
        for letter in letters:
            table.add_row(
                letter.message_id,
                letter.source_subscription or "?",
                str(letter.delivery_attempts or "?"),
                _age(letter.age_s(now)),
                letter.body(200),
            )
        Console().print(table)
        return 0
    finally:
        release(subscriber, path, leased)


class _TopicResolver:
    """Dead letter -> the topic of the subscription it came from (asked once per subscription)."""

    def __init__(self, target: Target, subscriber, publisher) -> None:  # noqa: ANN001
        self._target, self._subscriber, self._publisher = target, subscriber, publisher
        self._topics: dict[tuple[str, str], str] = {}

    def __call__(self, letter: DeadLetter) -> str:
        if not letter.source_subscription:
            raise LookupError(
                "no CloudPubSubDeadLetterSourceSubscription attribute: origin unknown"
            )
        project = letter.source_project or self._target.project
        subscription = letter.source_subscription
        if subscription.startswith("projects/"):  # a full path rather than the short name
            _, project, _, subscription = subscription.split("/", 3)
        key = (project, subscription)
        if key not in self._topics:
            self._topics[key] = self._look_up(project, subscription)
        return self._topics[key]

    def _look_up(self, project: str, subscription: str) -> str:
        from google.api_core import exceptions as gexc

        try:
            found = self._subscriber.get_subscription(
                subscription=self._subscriber.subscription_path(project, subscription)
            )
            if found.topic and not found.topic.endswith("/_deleted-topic_"):
                return found.topic
        except (gexc.NotFound, gexc.PermissionDenied):
            pass
        topic = self._target.subscription_topics.get(subscription)
        if topic is None:
            raise LookupError(f"subscription {subscription!r} not found and not in the footprint")
        return self._publisher.topic_path(project, topic)


def cmd_dlq_replay(args: argparse.Namespace) -> int:
    target = resolve_target(args)
    subscriber, publisher = target.subscriber_client(), target.publisher_client()
    path = _subscription_path(target, subscriber, args)
    topic_for: Callable[[DeadLetter], str] = _TopicResolver(target, subscriber, publisher)
    if getattr(args, "to", "bulk") == "bulk" and target.bulk_topic:
        # Replays are bulk work: the bulk function takes request messages and storage
        # notifications alike (their attributes travel with them).
        bulk_topic = publisher.topic_path(target.project, target.bulk_topic)
        topic_for = lambda _letter: bulk_topic  # noqa: E731 - one topic for every letter
    total = ReplayReport()
    seen: set[str] = set()
    limit = args.max if args.max is not None else float("inf")
    handled = 0
    others: list[DeadLetter] = []  # from other subscriptions: kept leased, released at the end
    try:
        while handled < limit:
            page = pull_dead_letters(
                subscriber, path, int(min(_PAGE, limit - handled)), seen, wait_s=_wait_s(target)
            )
            if not page:
                break
            letters = [x for x in page if _selected(x, args)]
            others += [x for x in page if not _selected(x, args)]
            if not letters:
                continue
            report = replay(subscriber, publisher, path, letters, topic_for)
            total.replayed.update(report.replayed)
            total.failed.update(report.failed)
            handled += len(letters)
            if not report.replayed:
                break  # nothing goes through: stop instead of pulling the same failures again
    finally:
        release(subscriber, path, others)
        publisher.stop()
    if args.json:
        print(
            json.dumps({"subscription": path, "replayed": total.replayed, "failed": total.failed})
        )
    else:
        for dead_id, new_id in total.replayed.items():
            print(f"replayed {dead_id} as {new_id}")
        for dead_id, reason in total.failed.items():
            print(f"kept {dead_id}: {reason}")
        print(f"{len(total.replayed)} replayed, {len(total.failed)} kept on {path}")
    return 0 if not total.failed else 2
