"""infra/ops/result_events.py: pulling result events, filtering, acknowledging what was read."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from google.pubsub_v1.types import PubsubMessage, PullResponse, ReceivedMessage

from infra.ops.result_events import EventFilter, LatestGenerations, describe, read_events
from shared.result_events import ResultEvent, parse_result_notification
from shared.results import Status

DATA = Path(__file__).resolve().parents[3] / "data"


def _message(message_id: str, *, model: str = "mobilenet_v2", status: str = "ok", generation: str = "7",
             source: str = "gs://triggerfish-images/cat.jpg", event_type: str = "OBJECT_FINALIZE",
             data: bytes | None = None) -> ReceivedMessage:  # fmt: skip
    recorded = json.loads((DATA / "gcs_results_notification.json").read_text())["message"]
    resource = json.loads(base64.b64decode(recorded["data"]))
    resource["generation"] = generation
    resource["name"] = f"{model}/{source.removeprefix('gs://')}.json"
    resource["metadata"].update({"triggerfish-model": model, "triggerfish-status": status,
                                 "triggerfish-source-uri": source})  # fmt: skip
    if status == "error":
        resource["metadata"]["triggerfish-error-reason"] = "not_an_image"
    attributes = {**recorded["attributes"], "eventType": event_type}
    return ReceivedMessage(
        ack_id=f"ack-{message_id}",
        message=PubsubMessage(
            data=data if data is not None else json.dumps(resource).encode(),
            attributes=attributes,
            message_id=message_id,
        ),  # fmt: skip
    )


class Subscriber:
    """Answers pulls from a script of batches; records acknowledgements and releases."""

    def __init__(self, *batches: list[ReceivedMessage]) -> None:
        self.batches = list(batches)
        self.acked: list[str] = []
        self.released: list[str] = []

    def pull(self, subscription: str, max_messages: int, timeout: float) -> PullResponse:
        return PullResponse(received_messages=self.batches.pop(0) if self.batches else [])

    def acknowledge(self, subscription: str, ack_ids: list[str]) -> None:
        self.acked += ack_ids

    def modify_ack_deadline(
        self, subscription: str, ack_ids: list[str], ack_deadline_seconds: int
    ) -> None:
        assert ack_deadline_seconds == 0
        self.released += ack_ids


def _event(message: ReceivedMessage) -> ResultEvent:
    event = parse_result_notification(dict(message.message.attributes), message.message.data)
    assert event is not None
    return event


def test_filters_select_by_model_status_and_source_or_result_prefix() -> None:
    cat = _event(_message("1"))
    error = _event(
        _message("2", status="error", model="text_detector", source="gs://other/dog.jpg")
    )
    assert EventFilter().matches(cat)
    assert EventFilter(model="mobilenet_v2").matches(cat) and not EventFilter(
        model="mobilenet_v2"
    ).matches(error)
    assert EventFilter(status=Status.ERROR).matches(error) and not EventFilter(
        status=Status.ERROR
    ).matches(cat)
    assert EventFilter(prefix="gs://triggerfish-images/c").matches(cat)
    assert EventFilter(prefix="gs://triggerfish-results/text_detector/").matches(error)
    assert not EventFilter(prefix="gs://triggerfish-images/d").matches(cat)
    with pytest.raises(ValueError, match="'images/'"):
        EventFilter(prefix="images/")


def test_a_drain_hands_on_what_matches_and_acknowledges_everything_it_read() -> None:
    batch = [
        _message("1"),
        _message("2", status="error"),
        _message("3", event_type="OBJECT_DELETE"),
        _message("4", data=b"garbage"),
    ]
    subscriber = Subscriber(batch)
    seen: list[ResultEvent] = []
    unreadable: list[str] = []

    report = read_events(subscriber, "p", seen.append, wanted=EventFilter(status=Status.OK), idle_s=0.0,
                         on_unreadable=lambda mid, err: unreadable.append(mid))  # fmt: skip

    assert [e.status for e in seen] == [Status.OK]
    assert (report.handed_on, report.filtered, report.not_results, report.unreadable) == (
        1,
        1,
        1,
        1,
    )
    assert unreadable == ["4"]
    assert sorted(subscriber.acked) == ["ack-1", "ack-2", "ack-3", "ack-4"]
    assert subscriber.released == []


def test_max_events_releases_what_it_did_not_hand_on() -> None:
    subscriber = Subscriber([_message(str(i), source=f"gs://b/{i}.jpg") for i in range(5)])
    seen: list[ResultEvent] = []

    report = read_events(subscriber, "p", seen.append, max_events=2, idle_s=0.0)

    assert report.handed_on == 2 and len(seen) == 2
    assert subscriber.acked == ["ack-0", "ack-1"]
    assert subscriber.released == ["ack-2", "ack-3", "ack-4"]


def test_a_reader_drops_duplicates_and_stale_generations() -> None:
    latest = LatestGenerations()
    newer, older = _event(_message("1", generation="9")), _event(_message("2", generation="8"))
    assert latest.is_new(newer)
    assert not latest.is_new(newer)  # the same write delivered again
    assert not latest.is_new(older)  # announced after a later write replaced it
    assert latest.is_new(_event(_message("3", generation="10")))


def test_one_line_says_status_model_source_and_what_was_found() -> None:
    line = describe(_event(_message("1")))
    assert (
        line
        == "2026-11-21T05:38:36Z  ok     mobilenet_v2:1  gs://triggerfish-images/cat.jpg#1795239515643133  tabby 0.873"
    )
    error = describe(_event(_message("2", status="error")))
    assert "error  mobilenet_v2:1" in error and error.endswith("not_an_image")
