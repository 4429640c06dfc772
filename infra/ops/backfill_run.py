"""Running a backfill: enumerate, plan, publish with flow control, watch results land.

Progress is measured where it matters, in the results bucket: the run lists the
result objects under the backfill's prefix (names and metadata only) every
``poll_s`` and counts an object done when its result for this model, version
and generation is there. Result bodies are read only to learn an error's reason.

A journal under the state directory records every message this machine
published (object URI and generation, publish time). A re-run waits for the
objects an interrupted run already published instead of publishing them again,
until ``resubmit_after_s`` has passed (then they are presumed lost, e.g. dead-lettered).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from infra.ops.backfill import (
    Batch,
    Plan,
    ResultRecord,
    SourceObject,
    Summary,
    Tracker,
    batches,
    common_prefix,
    make_plan,
    outcome,
    parse_source,
    parse_uri_list,
    result_name,
)
from infra.ops.pacing import ServePressure, Window
from infra.ops.target import Target
from shared.messages import Priority
from shared.results import version_sort_key
from shared.uris import GcsUri, parse_gcs_uri

logger = logging.getLogger(__name__)


class BackfillError(RuntimeError):
    """The backfill cannot start (no such source, no model version, bad options)."""


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    """What ``triggerfish submit`` was asked to do."""

    source: str | None = None
    uri_list: Path | None = None
    model: str | None = None
    version: str | None = None
    per_message: int = 16
    max_in_flight: int = 1000
    poll_s: float = 1.0
    stall_timeout_s: float = 600.0
    resubmit_after_s: float = 1800.0
    wait: bool = True
    dry_run: bool = False
    priority: Priority = Priority.BULK

    def check(self) -> None:
        if (self.source is None) == (self.uri_list is None):
            raise BackfillError("give exactly one of gs://BUCKET/PREFIX or --list FILE")
        if self.max_in_flight < self.per_message:
            raise BackfillError(
                f"--max-in-flight ({self.max_in_flight}) must be at least --per-message ({self.per_message})"
            )
        if self.poll_s <= 0 or self.stall_timeout_s <= 0 or self.resubmit_after_s < 0:
            raise BackfillError("--poll, --timeout must be > 0 and --resubmit-after >= 0")


class ProgressSink(Protocol):
    """Where a run reports what it is doing (the CLI draws a progress bar)."""

    def status(self, text: str) -> None: ...
    def start(self, total: int) -> None: ...
    def update(self, done: int, published: int, classes: str = "") -> None: ...


class Journal:
    """Messages published for one source, target, model and version, as JSON lines."""

    def __init__(self, target: Target, source: str, model: str, version: str) -> None:
        parts = (
            target.project,
            target.requests_topic,
            target.results_bucket,
            source,
            model,
            version,
        )
        key = "|".join(parts)
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.path = target.state_dir / "backfill" / f"{model}-{digest}.jsonl"

    def in_flight(self, now: float, window_s: float) -> dict[tuple[str, int | None], float]:
        """Object key -> publish time, for what was published within ``window_s``."""
        found: dict[tuple[str, int | None], float] = {}
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return found
        for line in lines:
            try:
                entry = json.loads(line)
                published_at = float(entry["t"])
                items = [
                    (str(uri), int(gen) if gen is not None else None) for uri, gen in entry["items"]
                ]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash
            if now - published_at <= window_s:
                for key in items:
                    found[key] = published_at
        return found

    def record(self, published_at: float, message_id: str, items: Iterable[SourceObject]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            "t": published_at,
            "id": message_id,
            "items": [[str(i.uri), i.generation] for i in items],
        }
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")

    def keep_only(self, outstanding: dict[str, tuple[SourceObject, float]]) -> None:
        """Rewrite the journal with just the objects still awaited (or remove it)."""
        if not outstanding:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            for source, published_at in outstanding.values():
                entry = {
                    "t": published_at,
                    "id": "",
                    "items": [[str(source.uri), source.generation]],
                }
                f.write(json.dumps(entry) + "\n")
        tmp.replace(self.path)


def newest_version(storage: Any, repository: str, model: str) -> str:
    """The newest version of ``model`` in a ``gs://`` model repository (numeric order)."""
    from serve.model.repository import CONFIG_FILE

    if not repository:
        raise BackfillError("no model repository known: give --version or --repository gs://BUCKET")
    bucket, prefix = parse_source(repository)
    base = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    versions = set()
    for blob in storage.list_blobs(bucket, prefix=f"{base}{model}/"):
        parts = blob.name[len(base) :].split("/")
        if len(parts) == 3 and parts[2] == CONFIG_FILE:
            versions.add(parts[1])
    if not versions:
        raise BackfillError(f"model {model!r} has no version in {repository}")
    return max(versions, key=version_sort_key)


def list_results(storage: Any, bucket: str, prefix: str) -> dict[str, ResultRecord]:
    """Result objects under ``prefix``: names and metadata only."""
    records = {}
    for blob in storage.list_blobs(
        bucket, prefix=prefix, fields="items(name,metadata,updated),nextPageToken"
    ):
        updated = blob.updated.timestamp() if blob.updated else 0.0
        records[blob.name] = ResultRecord.from_listing(blob.name, blob.metadata, updated)
    return records


def list_sources(storage: Any, source: str) -> tuple[list[SourceObject], list[str]]:
    """Objects under ``gs://bucket/prefix`` (folder placeholders left out), and unusable names."""
    bucket, prefix = parse_source(source)
    found, invalid = [], []
    for blob in storage.list_blobs(
        bucket, prefix=prefix, fields="items(name,generation),nextPageToken"
    ):
        if blob.name.endswith("/"):
            continue
        try:
            found.append(
                SourceObject(parse_gcs_uri(f"gs://{bucket}/{blob.name}"), int(blob.generation))
            )
        except Exception:  # noqa: BLE001 - any unusable name is reported, not fatal
            invalid.append(f"gs://{bucket}/{blob.name}")
    return found, invalid


class BackfillRun:
    """One ``triggerfish submit``: :meth:`plan`, then :meth:`run`."""

    def __init__(self, target: Target, options: BackfillOptions) -> None:
        options.check()
        self.target = target
        self.options = options
        self.run_id = uuid.uuid4().hex[:8]
        self.storage = target.storage_client()

    @property
    def source_spec(self) -> str:
        if self.options.source is not None:
            return self.options.source
        return str(Path(self.options.uri_list).resolve())

    def plan(self, sink: ProgressSink) -> Plan:
        opts = self.options
        model = opts.model or self.target.default_model
        version = opts.version
        if version is None:
            sink.status(f"finding the newest version of {model} in {self.target.models_repository}")
            version = newest_version(self.storage, self.target.models_repository, model)
        sink.status(f"listing {opts.source or opts.uri_list}")
        if opts.source is not None:
            sources, invalid = list_sources(self.storage, opts.source)
        else:
            try:
                uris, invalid = parse_uri_list(Path(opts.uri_list).read_text().splitlines())
            except OSError as err:
                raise BackfillError(f"cannot read --list {opts.uri_list}: {err}") from err
            sources = [SourceObject(uri) for uri in uris]
        names = [result_name(model, version, s.uri) for s in sources]
        sink.status(
            f"listing results under gs://{self.target.results_bucket}/{common_prefix(names)}"
        )
        records = (
            list_results(self.storage, self.target.results_bucket, common_prefix(names))
            if names
            else {}
        )
        missing: list[str] = []
        if opts.uri_list is not None:
            sources, missing = self._look_up(sources, names, records)
        journal = Journal(self.target, self.source_spec, model, version)
        in_flight = journal.in_flight(time.time(), opts.resubmit_after_s)
        plan = make_plan(sources, records, model, version, in_flight)
        plan.invalid, plan.missing = invalid, missing
        plan.found = len(sources) + len(invalid) + len(missing)
        return plan

    def _look_up(
        self, sources: list[SourceObject], names: list[str], records: dict[str, ResultRecord]
    ) -> tuple[list[SourceObject], list[str]]:
        """Generations of listed objects that already have a result (to tell if it is current)."""

        def generation(uri: GcsUri) -> int | None:
            blob = self.storage.bucket(uri.bucket).get_blob(uri.name)
            return int(blob.generation) if blob is not None else None

        ask = [s for s, name in zip(sources, names, strict=True) if name in records]
        with ThreadPoolExecutor(max_workers=16) as pool:
            generations = dict(zip(ask, pool.map(lambda s: generation(s.uri), ask), strict=True))
        looked_up, missing = [], []
        for source in sources:
            if source not in generations:
                looked_up.append(source)
            elif generations[source] is None:
                missing.append(str(source.uri))
            else:
                looked_up.append(SourceObject(source.uri, generations[source]))
        return looked_up, missing

    def summary_for(self, plan: Plan) -> Summary:
        return Summary(
            run_id=self.run_id, model=plan.model, version=plan.version,
            target=self.target.describe(), dry_run=self.options.dry_run, found=plan.found,
            skipped=plan.skipped, invalid=len(plan.invalid), missing=len(plan.missing),
            awaited=len(plan.awaiting), to_publish=len(plan.publish),
            results_prefix=f"gs://{self.target.results_bucket}/{plan.results_prefix}",
            priority=self.options.priority.value,
        )  # fmt: skip

    def run(self, plan: Plan, sink: ProgressSink) -> Summary:
        """Publish ``plan`` and wait for its results; Ctrl-C stops cleanly (see the module doc)."""
        summary = self.summary_for(plan)
        if self.options.dry_run:
            return summary
        started = time.monotonic()
        publishing = _Publishing(self, plan, summary, sink)
        try:
            publishing.loop()
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            publishing.close()
            summary.elapsed_s = time.monotonic() - started
        return summary


class _Publishing:
    """The state of one run's publish-and-watch loop."""

    def __init__(self, run: BackfillRun, plan: Plan, summary: Summary, sink: ProgressSink) -> None:
        from google.cloud.pubsub_v1 import types

        self.run, self.plan, self.summary, self.sink = run, plan, summary, sink
        opts = run.options
        self.queue: deque[Batch] = deque(
            batches(plan.publish, opts.per_message, plan.model, plan.version, run.run_id, opts.priority)
        )
        self.tracker = Tracker(plan.version)
        for name, (source, published_at) in plan.awaiting.items():
            self.tracker.expect(name, source, published_at)
        self.journal = Journal(run.target, run.source_spec, plan.model, plan.version)
        # Flow control: at most this much is handed to the client library unsent;
        # publish() blocks beyond it instead of buffering without bound.
        self.publisher = run.target.publisher_client(
            types.PublisherOptions(
                flow_control=types.PublishFlowControl(
                    message_limit=500,
                    byte_limit=8 * 1024 * 1024,
                    limit_exceeded_behavior=types.LimitExceededBehavior.BLOCK,
                )
            )
        )
        # Bulk work goes to the bulk topic (its own subscription, function and retries);
        # its messages say "bulk" too, so a target without one still treats them as bulk.
        bulk = opts.priority is Priority.BULK and run.target.bulk_topic
        topic = run.target.bulk_topic if bulk else run.target.requests_topic
        self.topic = self.publisher.topic_path(run.target.project, topic)
        sink.status(f"publishing {opts.priority.value} work to topic {topic}")
        # In flight: paced by Serve's bulk sheds where Serve can be read, else the fixed bound.
        self.pressure = ServePressure(run.target.serve_url) if run.target.serve_url else None
        start = None if self.pressure is not None else opts.max_in_flight
        self.window = Window(opts.per_message, opts.max_in_flight, start)
        self.classes = ""
        self.landed_since_look = 0
        self.window_limited = False  # since the last look, the window held publishing back
        self.sent: list[tuple[Future, Batch, float]] = []
        self.reads: list[Future] = []
        self.reader = ThreadPoolExecutor(max_workers=8, thread_name_prefix="result-read")
        self.prefix = plan.results_prefix
        self.landed = 0
        self.poll_every = run.options.poll_s
        self.next_poll = 0.0
        self.last_change = time.monotonic()
        sink.start(len(plan.publish) + len(plan.awaiting))

    def loop(self) -> None:
        opts = self.run.options
        while True:
            self._publish_window(self.window.size)
            self._settle_sent(block=False)
            if time.monotonic() >= self.next_poll and len(self.tracker):
                self._poll()
                self._look_at_serve()
            self.sink.update(self.landed, self.summary.published_images, self.classes)
            if not self.queue and not self.sent and (not len(self.tracker) or not opts.wait):
                return
            if time.monotonic() - self.last_change > opts.stall_timeout_s:
                logger.warning("no result for %.0f s; stopping the wait", opts.stall_timeout_s)
                return
            time.sleep(0.05)

    def _publish_window(self, max_in_flight: int) -> None:
        while self.queue and len(self.tracker) + len(self.queue[0].items) <= max_in_flight:
            batch = self.queue[0]
            published_at = time.time()
            future = self.publisher.publish(self.topic, batch.body)
            self.queue.popleft()  # only now: an interrupted publish() leaves it queued
            for item in batch.items:
                self.tracker.expect(self.plan.names[item.key], item, published_at)
            self.sent.append((future, batch, published_at))
        if self.queue:  # more to publish, held back by the window
            self.window_limited = True

    def _settle_sent(self, block: bool, timeout_s: float = 30.0) -> None:
        still = []
        for future, batch, published_at in self.sent:
            if not block and not future.done():
                still.append((future, batch, published_at))
                continue
            try:
                message_id = future.result(timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - reported per message; a re-run retries
                logger.warning("publishing %s failed: %s", batch.request_id, err)
                for item in batch.items:
                    self.tracker.forget(self.plan.names[item.key])
                self.summary.publish_failed += len(batch.items)
                continue
            self.journal.record(published_at, str(message_id), batch.items)
            self.summary.published_messages += 1
            self.summary.published_images += len(batch.items)
        self.sent = still

    def _poll(self) -> None:
        started = time.monotonic()
        records = list_results(self.run.storage, self.run.target.results_bucket, self.prefix)
        # A listing that takes long (a huge prefix) is not repeated back to back.
        self.poll_every = max(self.run.options.poll_s, 2 * (time.monotonic() - started))
        self.next_poll = time.monotonic() + self.poll_every
        landed = self.tracker.observe(records)
        self.landed_since_look += len(landed)
        if landed:
            self.last_change = time.monotonic()
        for record in landed:
            self.landed += 1
            if record.status == "ok":
                self.summary.ok += 1
            else:  # an error, or a result without status metadata: its body says which
                self.reads.append(self.reader.submit(self._read_outcome, record.name))

    def _look_at_serve(self) -> None:
        """Pace the window on Serve's sheds of bulk work; note the live/bulk split for the progress line."""
        change = self.pressure.look() if self.pressure is not None else None
        self.window.observe(change, self.landed_since_look, self.window_limited)
        self.window_limited = False
        self.summary.bulk_shed = self.window.shed_seen
        self.landed_since_look = 0
        if change is not None:
            seconds = max(self.poll_every, 1e-3)
            rates = {name: n / seconds for name, n in change.admitted.items()}
            self.classes = (
                f"serve: live {rates.get('live', 0.0):.1f}/s bulk {rates.get('bulk', 0.0):.1f}/s, "
                f"bulk shed {self.window.shed_seen}, window {self.window.size}"
            )

    def _read_outcome(self, name: str) -> str:
        blob = self.run.storage.bucket(self.run.target.results_bucket).blob(name)
        try:
            return outcome(json.loads(blob.download_as_bytes()))
        except Exception:  # noqa: BLE001 - counted under its own row
            return "unreadable_result"

    def close(self) -> None:
        """Flush what the client library holds, record it, count what is left."""
        try:
            self.publisher.stop()
        except Exception as err:  # noqa: BLE001 - already stopped, or the flush failed
            logger.warning("stopping the publisher: %s", err)
        self._settle_sent(block=True)
        self.reader.shutdown(wait=True)
        for future in self.reads:
            reason = future.result()
            if reason == "ok":
                self.summary.ok += 1
            else:
                self.summary.errors[reason] += 1
        if self.pressure is not None:
            self.pressure.close()
        self.summary.unfinished = len(self.tracker)
        self.summary.not_published = sum(len(b.items) for b in self.queue)
        self.journal.keep_only(self.tracker.outstanding())


def run_backfill(
    target: Target, options: BackfillOptions, sink: ProgressSink,
    on_plan: Callable[[Plan, Summary], None] | None = None,
) -> Summary:  # fmt: skip
    """Plan and run a backfill; ``on_plan`` sees the plan before anything is published."""
    run = BackfillRun(target, options)
    plan = run.plan(sink)
    if on_plan is not None:
        on_plan(plan, run.summary_for(plan))
    return run.run(plan, sink)
