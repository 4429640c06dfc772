"""Reading result events from the results pull subscription (``triggerfish results``).

Each message on the results topic is a Cloud Storage notification about one
object of the results bucket; :func:`shared.result_events.parse_result_notification`
turns it into a :class:`ResultEvent`. :func:`read_events` pulls, parses, filters
and hands each event to a callback, then acknowledges the whole pull: what was
handed on and what the filters dropped alike. A message that announces no result
(a deletion, a non-result object) is acknowledged too; one that cannot be read is
reported and acknowledged, since reading it again cannot succeed.

Delivery is at least once: an event handed on just before an interruption comes
again. :class:`LatestGenerations` drops the duplicates and stale events a reader
has already seen, by result URI and result generation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shared.result_events import (
    MalformedNotification,
    ResultEvent,
    ResultKind,
    parse_result_notification,
)
from shared.results import Status

# Acknowledge accepts at most this many ack ids per call.
_ACK_CHUNK = 1000
_PULL_BATCH = 100


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events a reader wants; an unset field matches everything.

    ``prefix`` is a ``gs://`` prefix of the source URI or of the result URI
    (``gs://images/cats/`` or ``gs://results/mobilenet_v2/``).
    """

    model: str | None = None
    status: Status | None = None
    prefix: str | None = None

    def __post_init__(self) -> None:
        if self.prefix is not None and not self.prefix.startswith("gs://"):
            raise ValueError(f"a prefix is a gs:// URI prefix, got {self.prefix!r}")

    def matches(self, event: ResultEvent) -> bool:
        if self.model is not None and event.model != self.model:
            return False
        if self.status is not None and event.status is not self.status:
            return False
        if self.prefix is not None:
            uris = (event.source_uri or "", event.result_uri)
            return any(uri.startswith(self.prefix) for uri in uris)
        return True


@dataclass
class LatestGenerations:
    """The highest result generation seen per result URI: what is not above it is old news."""

    seen: dict[str, int] = field(default_factory=dict)

    def is_new(self, event: ResultEvent) -> bool:
        """True the first time a write is seen; False for a duplicate or a stale event."""
        known = self.seen.get(event.result_uri)
        if known is not None and event.result_generation <= known:
            return False
        self.seen[event.result_uri] = event.result_generation
        return True


def describe(event: ResultEvent) -> str:
    """One line for a terminal: time, status, model, source and generation, what it found."""
    when = event.event_time.strftime("%Y-%m-%dT%H:%M:%SZ") if event.event_time else "-"
    model = f"{event.model or '?'}:{event.model_version or '?'}"
    source = f"{event.source_uri or '?'}#{event.source_generation or '?'}"
    found = event.summary.describe() if event.status is Status.OK else (event.error_reason or "?")
    kind = "" if event.kind is ResultKind.RESULT else f"  [{event.kind.value}]"
    return f"{when}  {event.status.value:<5}  {model}  {source}  {found}{kind}"


@dataclass
class ReadReport:
    """What one :func:`read_events` call did."""

    handed_on: int = 0
    filtered: int = 0
    not_results: int = 0
    unreadable: int = 0


def _pull(subscriber: Any, path: str, max_messages: int, wait_s: float) -> list[Any]:
    from google.api_core import exceptions as gexc

    try:
        answer = subscriber.pull(subscription=path, max_messages=max_messages, timeout=wait_s)
    except gexc.DeadlineExceeded:
        return []
    return list(answer.received_messages)


def _acknowledge(subscriber: Any, path: str, ack_ids: list[str]) -> None:
    for start in range(0, len(ack_ids), _ACK_CHUNK):
        subscriber.acknowledge(subscription=path, ack_ids=ack_ids[start : start + _ACK_CHUNK])


def _release(subscriber: Any, path: str, ack_ids: list[str]) -> None:
    for start in range(0, len(ack_ids), _ACK_CHUNK):
        chunk = ack_ids[start : start + _ACK_CHUNK]
        subscriber.modify_ack_deadline(subscription=path, ack_ids=chunk, ack_deadline_seconds=0)


def read_events(
    subscriber: Any,
    path: str,
    handle: Callable[[ResultEvent], None],
    *,
    wanted: EventFilter = EventFilter(),  # noqa: B008 - frozen, never mutated
    follow: bool = False,
    idle_s: float = 3.0,
    max_events: int | None = None,
    on_unreadable: Callable[[str, Exception], None] = lambda message_id, err: None,
    wait_s: float = 10.0,
) -> ReadReport:
    """Pull events from ``path`` and call ``handle`` for each one ``wanted`` matches.

    Without ``follow`` it returns once no message arrived for ``idle_s`` seconds;
    with it, it runs until interrupted. It stops after ``max_events`` handed-on events;
    messages pulled beyond them are released unacknowledged for the next reader.
    """
    report = ReadReport()
    last_message = time.monotonic()
    while max_events is None or report.handed_on < max_events:
        wait = (
            wait_s if follow else max(0.5, min(wait_s, idle_s - (time.monotonic() - last_message)))
        )
        received = _pull(subscriber, path, _PULL_BATCH, wait)
        if not received:
            if not follow and time.monotonic() - last_message >= idle_s:
                break
            continue
        last_message = time.monotonic()
        done, left = _handle_batch(received, handle, wanted, max_events, report, on_unreadable)
        _acknowledge(subscriber, path, done)
        _release(subscriber, path, left)
    return report


def _handle_batch(
    received: Iterable[Any],
    handle: Callable[[ResultEvent], None],
    wanted: EventFilter,
    max_events: int | None,
    report: ReadReport,
    on_unreadable: Callable[[str, Exception], None],
) -> tuple[list[str], list[str]]:
    """Hand on what ``wanted`` matches; returns the ack ids to acknowledge and to release."""
    done: list[str] = []
    left: list[str] = []
    for message in received:
        if max_events is not None and report.handed_on >= max_events:
            left.append(message.ack_id)
            continue
        done.append(message.ack_id)
        try:
            event = parse_result_notification(
                dict(message.message.attributes), bytes(message.message.data)
            )
        except MalformedNotification as err:
            report.unreadable += 1
            on_unreadable(message.message.message_id, err)
            continue
        if event is None:
            report.not_results += 1
        elif not wanted.matches(event):
            report.filtered += 1
        else:
            handle(event)
            report.handed_on += 1
    return done, left
