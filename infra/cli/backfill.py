"""``triggerfish submit``: backfill a bucket prefix or a list of URIs, with a progress bar."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from infra.ops.backfill import Plan, Summary
from infra.ops.backfill_run import BackfillOptions, run_backfill
from infra.ops.target import resolve_target
from shared.messages import Priority


class _RateColumn(ProgressColumn):
    """Images per second, from results landing (rich's windowed estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:5.1f} images/s" if speed else "    - images/s", style="cyan")


class _RichSink:
    """Planning steps as status lines, then one progress bar driven by landed results."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self._console = console
        self._quiet = quiet
        self._progress: Progress | None = None
        self._task = None

    def status(self, text: str) -> None:
        if not self._quiet:
            self._console.print(f"[dim]... {text}[/dim]")

    def start(self, total: int) -> None:
        if self._quiet or total == 0:
            return
        self._progress = Progress(
            TextColumn("[bold]results"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            TextColumn("published {task.fields[published]}"),
            TextColumn("[dim]{task.fields[classes]}"),
            console=self._console,
            speed_estimate_period=15.0,
        )
        self._task = self._progress.add_task("results", total=total, published=0, classes="")
        self._progress.start()

    def update(self, done: int, published: int, classes: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, published=published, classes=classes)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _describe_plan(console: Console, plan: Plan, summary: Summary, per_message: int) -> None:
    messages = -(-len(plan.publish) // per_message)
    verb = "would publish" if summary.dry_run else "publishing"
    console.print(
        f"{plan.model}:{plan.version}  {summary.target}\n"
        f"found {plan.found} objects: {verb} {len(plan.publish)} in {messages} messages, "
        f"skip {plan.skipped} (result stored), wait for {len(plan.awaiting)} published by an earlier run"
        + (f", {len(plan.invalid)} invalid" if plan.invalid else "")
        + (f", {len(plan.missing)} missing" if plan.missing else "")
    )
    if summary.dry_run:
        for source in plan.publish[:10]:
            console.print(f"  {source.uri}")
        if len(plan.publish) > 10:
            console.print(f"  ... and {len(plan.publish) - 10} more")
        console.print(f"results would land under {summary.results_prefix}")


def _print_summary(summary: Summary) -> None:
    table = Table(title=f"backfill {summary.run_id}: {summary.model}:{summary.version}")
    table.add_column("outcome")
    table.add_column("objects", justify="right")
    for label, count in summary.rows():
        table.add_row(label, str(count))
    out = Console(soft_wrap=True)
    out.print(table)
    rate = summary.processed / summary.elapsed_s if summary.elapsed_s else 0.0
    state = "interrupted; re-run the same command to resume" if summary.interrupted else "done"
    out.print(
        f"{summary.processed} results in {summary.elapsed_s:.1f} s ({rate:.1f} images/s), "
        f"{summary.published_images} images published in {summary.published_messages} messages "
        f"as {summary.priority} work ({summary.bulk_shed} bulk inputs shed by Serve meanwhile): {state}\n"
        f"results: {summary.results_prefix}"
    )


def cmd_submit(args: argparse.Namespace) -> int:
    options = BackfillOptions(
        source=args.source,
        uri_list=Path(args.list) if args.list else None,
        model=args.model,
        version=args.version,
        per_message=args.per_message,
        max_in_flight=args.max_in_flight,
        poll_s=args.poll,
        stall_timeout_s=args.timeout,
        resubmit_after_s=args.resubmit_after,
        wait=not args.no_wait,
        dry_run=args.dry_run,
        priority=Priority(args.priority),
    )
    target = resolve_target(args)
    # A process manager's SIGTERM stops a backfill as cleanly as Ctrl-C does.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    console = Console(stderr=True, soft_wrap=True)
    sink = _RichSink(console, quiet=args.json)

    def on_plan(plan: Plan, summary: Summary) -> None:
        if not args.json:
            _describe_plan(
                Console(soft_wrap=True) if options.dry_run else console,
                plan,
                summary,
                options.per_message,
            )

    try:
        summary = run_backfill(target, options, sink, on_plan=on_plan)
    finally:
        sink.stop()
        signal.signal(signal.SIGTERM, previous)
    if args.json:
        print(json.dumps(summary.to_dict()), flush=True)
    elif not summary.dry_run:
        _print_summary(summary)
    sys.stdout.flush()
    return 0 if summary.dry_run else summary.exit_code()
