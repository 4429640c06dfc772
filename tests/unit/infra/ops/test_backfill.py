"""infra/ops/backfill.py and infra/ops/backfill_run.py: planning, grouping, tracking, and a
whole run against in-memory fakes of Cloud Storage and the Pub/Sub publisher."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from infra.ops import backfill_run
from infra.ops.backfill import (
    ResultRecord,
    SourceObject,
    Summary,
    Tracker,
    answers,
    batches,
    common_prefix,
    make_plan,
    outcome,
    parse_source,
    parse_uri_list,
    result_name,
)
from infra.ops.backfill_run import (
    BackfillError,
    BackfillOptions,
    BackfillRun,
    Journal,
    newest_version,
)
from infra.ops.pacing import ClassCounts, Window
from shared.errors import ErrorReason
from shared.messages import (
    EntryPath,
    InferenceRequest,
    Priority,
    RequestMessage,
    parse_request_message,
)
from shared.result_store import result_metadata
from shared.results import InferenceResult, result_object_name
from shared.uris import GcsUri, parse_gcs_uri


def src(name: str, generation: int | None = 100) -> SourceObject:
    return SourceObject(GcsUri("images", name), generation)


def record(name: str, generation: int | None = 100, version: str | None = "1", status: str | None = "ok", updated: float = 0.0) -> ResultRecord:  # fmt: skip
    return ResultRecord(
        name=name, generation=generation, version=version, status=status, updated=updated
    )


def test_result_name_is_the_shared_scheme() -> None:
    uri = GcsUri("images", "a/b.jpg")
    name = result_name("mobilenet_v2", "3", uri)
    try:
        expected = result_object_name("mobilenet_v2", "3", uri)  # type: ignore[call-arg]
    except TypeError:
        expected = result_object_name("mobilenet_v2", uri)  # type: ignore[call-arg]
    assert name == expected
    assert name.startswith("mobilenet_v2/") and name.endswith("a/b.jpg.json")


def test_common_prefix_stops_at_a_folder() -> None:
    assert common_prefix(["m/1/b/photos/a1.json", "m/1/b/photos/a2.json"]) == "m/1/b/photos/"
    assert common_prefix(["m/1/b/x.json"]) == "m/1/b/"
    assert common_prefix([]) == ""


def test_parse_source() -> None:
    assert parse_source("gs://images/some/prefix") == ("images", "some/prefix")
    assert parse_source("gs://images") == ("images", "")
    with pytest.raises(ValueError, match="expected gs://"):
        parse_source("s3://images/x")
    with pytest.raises(ValueError, match="invalid bucket"):
        parse_source("gs://UPPER/x")


def test_parse_uri_list_skips_comments_and_reports_bad_lines() -> None:
    uris, invalid = parse_uri_list(["# header", "", "gs://images/a.jpg", "gs://images/a.jpg", "  gs://images/b.jpg ", "nope", "gs://images/"])  # fmt: skip
    assert [str(u) for u in uris] == ["gs://images/a.jpg", "gs://images/b.jpg"]
    assert invalid == ["nope", "gs://images/"]


@pytest.mark.parametrize(
    ("rec", "source", "published_at", "expected"),
    [
        (None, src("a"), None, False),
        (record("r", 100), src("a", 100), None, True),
        (
            record("r", 200),
            src("a", 100),
            None,
            True,
        ),  # a newer upload was processed: nothing to do
        (record("r", 50), src("a", 100), None, False),  # stale: the object changed since
        (record("r", 100, version="0"), src("a", 100), None, False),  # an older version's result
        (record("r", 100, version="2"), src("a", 100), None, True),  # a newer version outranks it
        (record("r", 100, version=None), src("a", 100), None, True),  # version only in the path
        (
            record("r", None, updated=1000.0),
            src("a", 100),
            1010.0,
            True,
        ),  # written after publishing
        (record("r", None, updated=100.0), src("a", 100), 1010.0, False),
        (record("r", None), src("a", 100), None, False),
        (
            record("r", 100, updated=2000.0),
            src("a", None),
            1000.0,
            True,
        ),  # listed URI, not looked up
    ],
)
def test_answers(rec, source, published_at, expected) -> None:  # noqa: ANN001
    assert answers(rec, source, "1", published_at) is expected


@pytest.mark.parametrize("reason", ["unknown_version", "unknown_model"])
def test_an_error_about_the_fleet_never_answers_an_input(reason: str) -> None:
    # Same generation and version, written after publishing: only the reason tells it apart.
    refused = replace(record("r", 100, status="error", updated=2000.0), reason=reason)
    assert not answers(refused, src("a", 100), "1", 1000.0)
    assert not answers(replace(refused, generation=None), src("a", 100), "1", 1000.0)


def test_an_error_about_the_input_answers_it() -> None:
    failed = replace(record("r", 100, status="error"), reason="not_an_image")
    assert answers(failed, src("a", 100), "1", None)


def test_a_record_reads_the_error_reason_from_its_metadata() -> None:
    meta = result_metadata(
        InferenceResult.failure(
            InferenceRequest(uri="gs://b/a.jpg", generation="100", request_id="r", entry_path=EntryPath.PUBSUB),
            ErrorReason.UNKNOWN_VERSION, "no version 9", model="m",
        )
    )  # fmt: skip
    listed = ResultRecord.from_listing("r", meta, 0.0)
    assert (listed.status, listed.reason, listed.version) == ("error", "unknown_version", None)


def test_make_plan_skips_answered_awaits_recent_and_publishes_the_rest() -> None:
    a, b, c = src("a.jpg"), src("b.jpg"), src("c.jpg")
    records = {result_name("m", "1", a.uri): record(result_name("m", "1", a.uri))}
    plan = make_plan([a, b, c], records, "m", "1", in_flight={b.key: 500.0})
    assert (plan.found, plan.skipped) == (3, 1)
    assert plan.publish == [c]
    assert plan.awaiting == {result_name("m", "1", b.uri): (b, 500.0)}
    assert set(plan.names) == {b.key, c.key}
    assert plan.results_prefix == common_prefix([result_name("m", "1", x.uri) for x in (a, b, c)])


def test_batches_group_uris_and_pin_model_and_version() -> None:
    items = [src(f"{i}.jpg") for i in range(5)]
    out = batches(items, 2, "mobilenet_v2", "3", "run1")
    assert [len(b.items) for b in out] == [2, 2, 1]
    assert [b.request_id for b in out] == ["backfill-run1-0", "backfill-run1-1", "backfill-run1-2"]
    first, last = (json.loads(b.body) for b in (out[0], out[-1]))
    assert first == {"uris": ["gs://images/0.jpg", "gs://images/1.jpg"], "model": "mobilenet_v2", "version": "3", "request_id": "backfill-run1-0", "priority": "bulk"}  # fmt: skip
    assert last["uri"] == "gs://images/4.jpg" and "uris" not in last
    requests = parse_request_message(out[0].body, "msg-1")  # what on_request does with it
    assert [(r.uri, r.model, r.version, r.request_id) for r in requests] == [
        ("gs://images/0.jpg", "mobilenet_v2", "3", "backfill-run1-0/0"),
        ("gs://images/1.jpg", "mobilenet_v2", "3", "backfill-run1-0/1"),
    ]
    assert RequestMessage.model_validate_json(out[1].body).uris == [
        "gs://images/2.jpg",
        "gs://images/3.jpg",
    ]


@pytest.mark.parametrize("per_message", [0, 101])
def test_batches_refuse_sizes_the_message_schema_refuses(per_message: int) -> None:
    with pytest.raises(ValueError, match=f"per_message must be 1..100, got {per_message}"):
        batches([src("a")], per_message, "m", "1", "r")


def test_tracker_reports_each_landed_result_once() -> None:
    tracker = Tracker("1")
    tracker.expect("r/a", src("a", 100), 10.0)
    tracker.expect("r/b", src("b", 100), 10.0)
    assert tracker.observe({"r/a": record("r/a", 99)}) == []  # an older generation's result
    landed = tracker.observe({"r/a": record("r/a", 100), "r/x": record("r/x")})
    assert [r.name for r in landed] == ["r/a"] and len(tracker) == 1
    assert tracker.observe({"r/a": record("r/a", 100)}) == []


def test_outcome_and_summary() -> None:
    assert outcome({"status": "ok"}) == "ok"
    assert outcome({"status": "error", "error": {"reason": "not_an_image"}}) == "not_an_image"
    assert outcome({"status": "error"}) == "unknown"
    summary = Summary(run_id="r", model="m", version="1", target="t", ok=5, skipped=2)
    summary.errors["not_an_image"] = 1
    assert summary.rows() == [
        ("ok", 5),
        ("error: not_an_image", 1),
        ("skipped: result already stored", 2),
    ]
    assert (summary.processed, summary.exit_code()) == (6, 2)
    summary.unfinished = 1
    assert (
        summary.exit_code() == 3
        and ("no result yet (re-run to wait or resubmit)", 1) in summary.rows()
    )
    summary.interrupted = True
    assert summary.exit_code() == 130
    assert json.loads(json.dumps(summary.to_dict()))["errors"] == {"not_an_image": 1}


def test_options_are_checked() -> None:
    with pytest.raises(BackfillError, match="exactly one of"):
        BackfillOptions().check()
    with pytest.raises(BackfillError, match="exactly one of"):
        BackfillOptions(source="gs://b/p", uri_list=Path("x")).check()
    with pytest.raises(
        BackfillError, match=r"--max-in-flight \(4\) must be at least --per-message \(16\)"
    ):
        BackfillOptions(source="gs://b/p", max_in_flight=4).check()


# ---- a whole run against fakes -------------------------------------------------------


@dataclass
class FakeBlob:
    name: str
    data: bytes = b""
    generation: int = 1
    metadata: dict[str, str] | None = None
    updated: datetime = field(default_factory=lambda: datetime.now(UTC))

    def download_as_bytes(self) -> bytes:
        return self.data


class FakeBucket:
    def __init__(self, store: FakeStorage, name: str) -> None:
        self.store, self.name = store, name

    def blob(self, name: str) -> FakeBlob:
        return self.store.buckets[self.name][name]

    def get_blob(self, name: str) -> FakeBlob | None:
        return self.store.buckets[self.name].get(name)


class FakeStorage:
    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, FakeBlob]] = {"images": {}, "results": {}, "models": {}}

    def bucket(self, name: str) -> FakeBucket:
        return FakeBucket(self, name)

    def list_blobs(
        self, bucket: str, prefix: str = "", fields: str | None = None
    ) -> list[FakeBlob]:
        return [b for n, b in sorted(self.buckets[bucket].items()) if n.startswith(prefix)]

    def store_result(
        self, uri: str, version: str, status: str = "ok", reason: str | None = None
    ) -> None:
        source = parse_gcs_uri(uri)
        generation = self.buckets[source.bucket][source.name].generation
        body: dict[str, Any] = {
            "status": status,
            "source": {"uri": uri, "generation": str(generation)},
        }
        if reason:
            body["error"] = {"reason": reason, "message": "x"}
        meta = {
            "triggerfish-source-generation": str(generation),
            "triggerfish-model-version": version,
        }
        meta["triggerfish-status"] = status
        name = result_name("m", version, source)
        self.buckets["results"][name] = FakeBlob(name, json.dumps(body).encode(), metadata=meta)


class FakePublisher:
    """Publishes instantly; the 'pipeline' stores a result per URI (an error for names with 'bad')."""

    def __init__(self, storage: FakeStorage, fail_after: int | None = None, interrupt_after: int | None = None) -> None:  # fmt: skip
        self.storage, self.bodies, self.topics = storage, [], []
        self.fail_after, self.interrupt_after = fail_after, interrupt_after
        self.stopped = False

    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"

    def publish(self, topic: str, data: bytes) -> Future:
        if self.interrupt_after is not None and len(self.bodies) >= self.interrupt_after:
            raise KeyboardInterrupt
        future: Future = Future()
        self.topics.append(topic)
        self.bodies.append(json.loads(data))
        if self.fail_after is not None and len(self.bodies) > self.fail_after:
            future.set_exception(RuntimeError("publish refused"))
            return future
        message = self.bodies[-1]
        for uri in message.get("uris") or [message["uri"]]:
            bad = "bad" in uri
            self.storage.store_result(uri, message["version"], "error" if bad else "ok", "not_an_image" if bad else None)  # fmt: skip
        future.set_result(str(len(self.bodies)))
        return future

    def stop(self) -> None:
        self.stopped = True


@dataclass
class FakeTarget:
    storage: FakeStorage
    publisher: FakePublisher
    state_dir: Path
    project: str = "p"
    requests_topic: str = "requests"
    results_bucket: str = "results"
    models_repository: str = "gs://models"
    default_model: str = "m"
    local: bool = True
    bulk_topic: str = "bulk"
    serve_url: str = ""

    def describe(self) -> str:
        return "fake"

    def storage_client(self) -> FakeStorage:
        return self.storage

    def publisher_client(self, publisher_options: Any = None) -> FakePublisher:
        return self.publisher


class QuietSink:
    def __init__(self) -> None:
        self.total, self.done = None, []

    def status(self, text: str) -> None:
        pass

    def start(self, total: int) -> None:
        self.total = total

    def update(self, done: int, published: int, classes: str = "") -> None:
        self.done.append(done)


def fake_target(tmp_path: Path, names: list[str], **publisher_kw: Any) -> FakeTarget:
    storage = FakeStorage()
    for i, name in enumerate(names):
        storage.buckets["images"][name] = FakeBlob(name, generation=1000 + i)
    storage.buckets["images"]["photos/"] = FakeBlob("photos/")  # a folder placeholder
    for path in (
        "m/1/config.yaml",
        "m/2/config.yaml",
        "m/10/config.yaml",
        "m/10/model.onnx",
        "other/11/config.yaml",
    ):
        storage.buckets["models"][path] = FakeBlob(path)
    return FakeTarget(storage, FakePublisher(storage, **publisher_kw), tmp_path)


def run(target: FakeTarget, **options: Any) -> tuple[Summary, QuietSink]:
    sink = QuietSink()
    backfill = BackfillRun(
        target, BackfillOptions(**{"source": "gs://images/photos", "poll_s": 0.01, **options})
    )  # type: ignore[arg-type]
    return backfill.run(backfill.plan(sink), sink), sink


def test_newest_version_is_numeric() -> None:
    storage = fake_target(Path("."), []).storage
    assert newest_version(storage, "gs://models", "m") == "10"
    with pytest.raises(BackfillError, match="model 'absent' has no version in gs://models"):
        newest_version(storage, "gs://models", "absent")


def test_a_run_publishes_everything_once_and_a_rerun_skips_it(tmp_path: Path) -> None:
    names = [f"photos/{i}.jpg" for i in range(7)] + ["photos/bad.jpg"]
    target = fake_target(tmp_path, names)

    summary, sink = run(target, per_message=3)

    assert summary.version == "10"  # the newest, pinned in every message
    assert {b["version"] for b in target.publisher.bodies} == {"10"}
    assert (summary.found, summary.published_images, summary.published_messages) == (8, 8, 3)
    assert (summary.ok, dict(summary.errors), summary.unfinished) == (7, {"not_an_image": 1}, 0)
    assert summary.exit_code() == 2 and target.publisher.stopped
    assert sink.total == 8 and sink.done[-1] == 8
    assert not any((tmp_path / "backfill").glob("*.jsonl"))  # nothing left in flight

    again, _ = run(target, per_message=3)
    assert (again.published_images, again.skipped, again.exit_code()) == (0, 8, 0)


@pytest.mark.parametrize(("priority", "topic"), [(Priority.BULK, "bulk"), (Priority.LIVE, "requests")])
def test_a_run_publishes_its_class_to_its_topic(tmp_path: Path, priority: Priority, topic: str) -> None:
    target = fake_target(tmp_path, [f"photos/{i}.jpg" for i in range(3)])

    summary, _ = run(target, per_message=2, priority=priority)

    assert set(target.publisher.topics) == {f"projects/p/topics/{topic}"}
    assert {b["priority"] for b in target.publisher.bodies} == {priority.value}
    assert summary.to_dict()["priority"] == priority.value and summary.ok == 3


def test_bulk_without_a_bulk_topic_goes_to_the_requests_topic_marked_bulk(tmp_path: Path) -> None:
    target = dataclasses.replace(fake_target(tmp_path, ["photos/a.jpg"]), bulk_topic="")

    run(target)

    assert target.publisher.topics == ["projects/p/topics/requests"]
    assert target.publisher.bodies[0]["priority"] == "bulk"


def test_dry_run_publishes_nothing(tmp_path: Path) -> None:
    target = fake_target(tmp_path, ["photos/a.jpg", "photos/b.jpg"])
    summary, _ = run(target, dry_run=True, version="1")
    assert (summary.to_publish, summary.published_images, target.publisher.bodies) == (2, 0, [])


def test_an_interrupted_run_records_what_it_published_and_the_rerun_waits_for_it(
    tmp_path: Path,
) -> None:
    names = [f"photos/{i}.jpg" for i in range(6)]
    target = fake_target(tmp_path, names, interrupt_after=2)
    # The 'pipeline' is slow: no result lands before the interruption.
    target.storage.store_result, stored = (lambda *a, **k: None), target.storage.store_result  # type: ignore[method-assign]

    summary, _ = run(target, per_message=2, version="1")

    assert summary.interrupted and summary.exit_code() == 130
    assert (summary.published_images, summary.unfinished, summary.not_published) == (4, 4, 2)
    journal = Journal(target, "gs://images/photos", "m", "1")  # type: ignore[arg-type]
    in_flight = journal.in_flight(now=time.time(), window_s=3600)
    assert {uri for uri, _ in in_flight} == {f"gs://images/{n}" for n in names[:4]}

    # Their results land meanwhile; the re-run publishes only the two it never sent.
    for n in names[:4]:
        stored(f"gs://images/{n}", "1")
    target.storage.store_result = stored  # type: ignore[method-assign]
    target.publisher.interrupt_after = None
    again, _ = run(target, per_message=2, version="1")
    assert (again.skipped, again.awaited, again.published_images, again.ok) == (4, 0, 2, 2)


def test_objects_published_earlier_are_awaited_not_republished(tmp_path: Path) -> None:
    names = [f"photos/{i}.jpg" for i in range(3)]
    target = fake_target(tmp_path, names)
    journal = Journal(target, "gs://images/photos", "m", "1")  # type: ignore[arg-type]
    journal.record(time.time(), "earlier", [SourceObject(GcsUri("images", names[0]), 1000)])
    target.storage.store_result(f"gs://images/{names[0]}", "1")  # lands while this run waits

    summary, _ = run(target, version="1", resubmit_after_s=3600)
    assert (summary.skipped, summary.published_images) == (1, 2)  # it had landed by planning time

    journal.record(time.time(), "earlier", [SourceObject(GcsUri("images", names[1]), 1001)])
    target.storage.buckets["results"].clear()
    summary, _ = run(target, version="1", resubmit_after_s=3600, stall_timeout_s=0.3)
    assert (summary.awaited, summary.published_images, summary.unfinished) == (1, 2, 1)
    assert [b.get("uris") or [b["uri"]] for b in target.publisher.bodies][-1] == ["gs://images/photos/0.jpg", "gs://images/photos/2.jpg"]  # fmt: skip

    target.storage.buckets["results"].clear()
    summary, _ = run(target, version="1", resubmit_after_s=0)  # presumed lost: publish again
    assert (summary.awaited, summary.published_images) == (0, 3)


def test_failed_publishes_are_counted_not_awaited(tmp_path: Path) -> None:
    target = fake_target(tmp_path, [f"photos/{i}.jpg" for i in range(4)], fail_after=1)
    summary, _ = run(target, per_message=2, version="1")
    assert (summary.ok, summary.publish_failed, summary.unfinished) == (2, 2, 0)
    assert summary.exit_code() == 3


def test_a_stalled_pipeline_ends_the_wait(tmp_path: Path) -> None:
    target = fake_target(tmp_path, ["photos/a.jpg"])
    target.storage.store_result = lambda *a, **k: None  # type: ignore[method-assign]
    summary, _ = run(target, version="1", stall_timeout_s=0.2)
    assert (summary.published_images, summary.unfinished, summary.exit_code()) == (1, 1, 3)


def test_uri_list_looks_up_generations_only_where_a_result_exists(tmp_path: Path) -> None:
    target = fake_target(tmp_path, ["photos/a.jpg", "photos/b.jpg"])
    target.storage.store_result("gs://images/photos/a.jpg", "1")
    listing = tmp_path / "uris.txt"
    listing.write_text("gs://images/photos/a.jpg\ngs://images/photos/b.jpg\nbad line\n")
    summary, _ = run(target, source=None, uri_list=listing, version="1")
    assert (
        summary.found,
        summary.skipped,
        summary.invalid,
        summary.published_images,
        summary.ok,
    ) == (3, 1, 1, 1, 1)


def test_record_from_listing() -> None:
    rec = ResultRecord.from_listing(
        "n", {"triggerfish-source-generation": "12", "triggerfish-status": "ok"}, 5.0
    )
    assert (rec.generation, rec.version, rec.status, rec.updated) == (12, None, "ok", 5.0)
    assert ResultRecord.from_listing("n", None, 0.0).generation is None


def test_the_window_grows_when_it_held_publishing_back_and_results_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = dataclasses.replace(fake_target(tmp_path, [f"photos/{i}.jpg" for i in range(200)]), serve_url="x")
    sizes: list[int] = []

    class Pressure:
        def __init__(self, url: str) -> None: ...

        def look(self) -> ClassCounts:
            return ClassCounts({"bulk": 0}, {"bulk": 0})

        def close(self) -> None: ...

    class RecordedWindow(Window):
        def observe(self, change: ClassCounts | None, landed: int, full: bool) -> None:
            super().observe(change, landed, full)
            sizes.append(self.size)

    monkeypatch.setattr(backfill_run, "ServePressure", Pressure)
    monkeypatch.setattr(backfill_run, "Window", RecordedWindow)

    summary, _ = run(target, per_message=4)

    assert summary.ok == 200
    assert sizes[0] > 16 and max(sizes) > sizes[0], sizes  # from 4 messages, grown by what landed
