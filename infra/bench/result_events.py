"""Result events on the local stack: N uploads give N events, none before its result is readable.

Uploads ``--uploads`` small photos under a fresh prefix of the images bucket, then
reads the results subscription (``triggerfish results``' reader) and, the moment
each event arrives, reads the result object it names. It reports:

* events, and distinct writes among them (result URI and result generation);
* duplicates, split into those with the same content (allowed: delivery is at least
  once) and those that differ (never allowed);
* uploads without an event, and events whose source generation is not the upload's;
* early events: the result object was missing, or older than the event, when the
  event arrived (never allowed: Cloud Storage notifies after the object is final);
* replacements without an event: the object read had a later generation than the event
  and no event announced that generation;
* the time from the first upload to the last event.

With ``--late`` the reader starts only after every result is stored: a consumer
started late catches up from the subscription's backlog.

    python -m infra.bench.result_events --uploads 1000 [--late] [--timeout 900]

It uses the running stack (``triggerfish up``) or, when none runs, starts one for the run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.local.client import StackClient
from infra.ops.result_events import EventFilter, read_events
from infra.ops.target import local_target
from shared.result_events import ResultEvent

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHOTOS = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg")


@dataclass(frozen=True, slots=True)
class Observation:
    """One event and what the result object was when the event arrived (``None``: missing)."""

    event: ResultEvent
    object_generation: int | None
    object_metadata: dict[str, str] | None
    arrived_s: float


@dataclass
class EventWatch:
    """Uploads made under one prefix and the events observed for them."""

    client: StackClient
    prefix: str
    uploads: dict[str, str] = field(default_factory=dict)  # source URI -> generation
    observations: list[Observation] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def upload(self, count: int, threads: int = 8) -> None:
        """Upload ``count`` sample photos as ``PREFIX/NNNNN-NAME``."""
        photos = [(SAMPLES / name).read_bytes() for name in PHOTOS]

        def one(i: int) -> tuple[str, str]:
            name = f"{self.prefix}{i:05d}-{PHOTOS[i % len(PHOTOS)]}"
            uri, generation = self.client.upload(
                Path(name), name=name, data=photos[i % len(photos)]
            )
            return str(uri), generation

        self.started = time.monotonic()
        with ThreadPoolExecutor(threads) as pool:
            self.uploads.update(pool.map(one, range(count)))

    def missing(self) -> set[str]:
        """Uploads with no event for their generation yet."""
        seen = {(o.event.source_uri, o.event.source_generation) for o in self.observations}
        return {uri for uri, gen in self.uploads.items() if (uri, gen) not in seen}

    def collect(self, timeout: float, idle_s: float = 5.0) -> None:
        """Read events for this prefix until every upload has one or ``timeout`` passes."""
        state = self.client.state
        target = local_target(state, Path(state.state_dir))
        subscriber = target.subscriber_client()
        path = subscriber.subscription_path(state.project, target.results_subscription)
        bucket = self.client.storage.bucket(state.results_bucket)
        wanted = EventFilter(prefix=f"gs://{state.images_bucket}/{self.prefix}")

        def observe(event: ResultEvent) -> None:
            blob = bucket.get_blob(event.result_uri.removeprefix(f"gs://{state.results_bucket}/"))
            self.observations.append(
                Observation(
                    event,
                    int(blob.generation) if blob is not None else None,
                    dict(blob.metadata or {}) if blob is not None else None,
                    time.monotonic() - self.started,
                )
            )

        deadline = time.monotonic() + timeout
        while self.missing() and time.monotonic() < deadline:
            read_events(subscriber, path, observe, wanted=wanted, idle_s=idle_s, wait_s=2.0)

    def report(self) -> dict[str, Any]:
        """The counts described in the module docstring."""
        by_write: dict[tuple[str, int], list[ResultEvent]] = defaultdict(list)
        for o in self.observations:
            by_write[o.event.key].append(o.event)
        duplicates = sum(len(events) - 1 for events in by_write.values())
        differing = sum(
            len(events) - 1
            for events in by_write.values()
            if any(
                e.model_dump(exclude={"event_time"}) != events[0].model_dump(exclude={"event_time"})
                for e in events
            )
        )
        writes = set(by_write)
        early = [
            o
            for o in self.observations
            if o.object_generation is None or o.object_generation < o.event.result_generation
        ]
        # Replaced by the time it was read: fine when the replacement's own event came too.
        unannounced = [
            o
            for o in self.observations
            if o.object_generation is not None
            and o.object_generation > o.event.result_generation
            and (o.event.result_uri, o.object_generation) not in writes
        ]
        wrong_generation = [
            o
            for o in self.observations
            if self.uploads.get(o.event.source_uri or "") != o.event.source_generation
        ]
        return {
            "uploads": len(self.uploads),
            "events": len(self.observations),
            "distinct": len(by_write),
            "duplicates_same_content": duplicates - differing,
            "duplicates_differing": differing,
            "uploads_without_event": len(self.missing()),
            "events_with_another_source_generation": len(wrong_generation),
            "early_events": len(early),
            "replacements_without_event": len(unannounced),
            "time_to_last_event_s": round(
                max((o.arrived_s for o in self.observations), default=0.0), 1
            ),
        }


def _client(state_dir: Path | None) -> tuple[StackClient, Any]:
    from infra.local.stack import (
        DEFAULT_STATE_DIR,
        LocalStack,
        StackNotRunning,
        StackOptions,
        StackState,
    )

    try:
        return StackClient(StackState.load(state_dir or DEFAULT_STATE_DIR)), None
    except StackNotRunning:
        pass
    import tempfile

    stack = LocalStack(StackOptions(state_dir=Path(tempfile.mkdtemp(prefix="tf-events-"))))
    return StackClient(stack.start(progress=print)), stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=1000)
    parser.add_argument(
        "--late", action="store_true", help="start reading only after every result is stored"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for the last event"
    )
    parser.add_argument("--state-dir", type=Path, help="a running stack's state directory")
    args = parser.parse_args(argv)
    if args.uploads < 1:
        parser.error(f"--uploads must be >= 1, got {args.uploads}")
    client, started_stack = _client(args.state_dir)
    try:
        watch = EventWatch(client, prefix=f"events-{int(time.time())}/")
        watch.upload(args.uploads)
        if args.late:
            for uri, generation in watch.uploads.items():
                client.wait_result(uri, args.timeout, generation=generation)
        watch.collect(args.timeout)
        print(json.dumps({"late_consumer": args.late, **watch.report()}, indent=2))  # noqa: T201 - the report
    finally:
        if started_stack is not None:
            started_stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
