"""The 1,000-upload check's counting: duplicates, early events, uploads without an event."""

from __future__ import annotations

from infra.bench.result_events import EventWatch, Observation
from shared.result_events import ResultEvent, ResultKind
from shared.results import Status


def _event(
    name: str, generation: int, source_generation: str = "1", label: str = "tabby"
) -> ResultEvent:
    return ResultEvent(
        kind=ResultKind.RESULT,
        result_uri=f"gs://results/m/images/{name}.json",
        result_generation=generation,
        source_uri=f"gs://images/{name}",
        source_generation=source_generation,
        model="m",
        status=Status.OK,
        summary={"top_label": label},
    )


def _seen(event: ResultEvent, object_generation: int | None, at: float = 1.0) -> Observation:
    return Observation(event, object_generation, {} if object_generation else None, at)


def test_duplicates_early_events_and_missing_uploads_are_counted_apart() -> None:
    watch = EventWatch(client=None, prefix="p/")  # type: ignore[arg-type]
    watch.uploads = {
        "gs://images/a": "1",
        "gs://images/b": "1",
        "gs://images/c": "1",
        "gs://images/d": "1",
    }
    a = _event("a", 10)
    watch.observations = [
        _seen(a, 10, at=2.0),
        _seen(a, 10, at=3.5),  # a duplicate with the same content
        _seen(_event("b", 20, label="other"), 20),
        _seen(_event("b", 20), 20),  # same write, different content: never allowed
        _seen(_event("c", 30), None),  # announced before its object was readable
        _seen(_event("d", 40, source_generation="2"), 40),  # not the uploaded generation
    ]

    report = watch.report()

    assert report["events"] == 6 and report["distinct"] == 4
    assert (report["duplicates_same_content"], report["duplicates_differing"]) == (1, 1)
    assert report["early_events"] == 1
    assert report["events_with_another_source_generation"] == 1
    assert report["uploads_without_event"] == 1  # d's upload had no event for its generation
    assert report["time_to_last_event_s"] == 3.5


def test_an_object_replaced_by_the_time_it_is_read_needs_an_event_of_its_own() -> None:
    watch = EventWatch(client=None, prefix="p/")  # type: ignore[arg-type]
    watch.uploads = {"gs://images/a": "1"}
    watch.observations = [_seen(_event("a", 10), 11)]
    assert (watch.report()["early_events"], watch.report()["replacements_without_event"]) == (0, 1)
    watch.observations.append(_seen(_event("a", 11), 11))
    assert watch.report()["replacements_without_event"] == 0
