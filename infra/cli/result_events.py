"""``triggerfish results`` without a URI: result events from the results subscription."""

from __future__ import annotations

import argparse
import sys

from infra.ops.result_events import EventFilter, LatestGenerations, describe, read_events
from infra.ops.target import resolve_target
from shared.result_events import ResultEvent
from shared.results import Status

# Flags that only make sense for the event stream, not for one stored result.
EVENT_FLAGS = ("follow", "status", "prefix", "max", "project", "terraform_dir", "subscription")
# Without --follow: how long no new message means the backlog is drained.
IDLE_S = 3.0


def cmd_result_events(args: argparse.Namespace) -> int:
    """Print one line (or one JSON object) per new result event; acknowledge as it goes."""
    target = resolve_target(args, publishing=False)
    subscriber = target.subscriber_client()
    path = subscriber.subscription_path(
        target.project, args.subscription or target.results_subscription
    )
    wanted = EventFilter(
        model=args.model, status=Status(args.status) if args.status else None, prefix=args.prefix
    )
    latest = LatestGenerations()

    def show(event: ResultEvent) -> None:
        if not latest.is_new(event):  # a redelivery, or a write already replaced
            return
        print(event.model_dump_json() if args.json else describe(event), flush=True)

    def unreadable(message_id: str, err: Exception) -> None:
        print(f"triggerfish results: skipped message {message_id}: {err}", file=sys.stderr)

    if not args.json and args.follow:
        print(f"following {path} (Ctrl-C to stop)", file=sys.stderr)
    report = read_events(
        subscriber, path, show, wanted=wanted, follow=args.follow, max_events=args.max,
        idle_s=IDLE_S, on_unreadable=unreadable, wait_s=10.0 if args.follow else 2.0,
    )  # fmt: skip
    if not args.json:
        print(
            f"{report.handed_on} event(s); {report.filtered} filtered out, "
            f"{report.not_results} not about a result, {report.unreadable} unreadable",
            file=sys.stderr,
        )
    return 0 if not report.unreadable else 2


def check_flags(args: argparse.Namespace) -> None:
    """A URI asks for one stored result: the event-stream flags do not apply to it."""
    given = [f"--{name.replace('_', '-')}" for name in EVENT_FLAGS if getattr(args, name, None)]
    if given:
        raise ValueError(f"{', '.join(given)} read result events: give no URI with them")
