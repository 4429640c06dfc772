"""``triggerfish results``: one stored result with a URI, the event stream without one."""

from __future__ import annotations

import json
from typing import Any

import pytest

from infra.cli import main as cli
from infra.cli import result_events
from infra.ops.target import Target
from tests.unit.infra.ops.test_result_events import Subscriber, _message


@pytest.fixture
def subscriber(monkeypatch: pytest.MonkeyPatch) -> Subscriber:
    messages = [_message("1"), _message("2", generation="6"), _message("3", status="error",
                source="gs://triggerfish-images/x.jpg"), _message("1")]  # fmt: skip
    fake = Subscriber(messages)
    fake.subscription_path = lambda project, name: f"projects/{project}/subscriptions/{name}"  # type: ignore[attr-defined]
    target = Target(project="p", requests_topic="", results_bucket="", models_repository="",
                    dead_letter_subscription="d", results_subscription="triggerfish-results-events-pull")  # fmt: skip
    monkeypatch.setattr(Target, "subscriber_client", lambda self: fake)
    monkeypatch.setattr(result_events, "resolve_target", lambda args, publishing: target)
    monkeypatch.setattr(result_events, "IDLE_S", 0.0)
    return fake


def test_json_lines_one_per_new_event_then_everything_is_acknowledged(
    subscriber: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["results", "--json"]) == 0

    lines: list[dict[str, Any]] = [
        json.loads(line) for line in capsys.readouterr().out.splitlines()
    ]
    # message 2 is an older generation of the same result, the last a duplicate: both dropped
    assert [(e["status"], e["result_generation"]) for e in lines] == [("ok", 7), ("error", 7)]
    assert lines[0]["source_uri"] == "gs://triggerfish-images/cat.jpg"
    assert lines[0]["summary"] == {"top_label": "tabby", "top_score": 0.8731, "detections": None}
    assert len(subscriber.acked) == 4


def test_status_filter_and_human_lines(
    subscriber: Subscriber, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["results", "--status", "error"]) == 0

    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "2026-11-21T05:38:36Z  error  mobilenet_v2:1  gs://triggerfish-images/x.jpg#1795239515643133  not_an_image"
    ]
    assert "3 filtered out" in err


def test_event_flags_with_a_uri_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["results", "gs://triggerfish-images/cat.jpg", "--follow"]) == 1
    assert "--follow read result events: give no URI with them" in capsys.readouterr().err
