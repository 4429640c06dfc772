"""infra/cli/backfill.py: the plan line, the progress bar and the summary table, on fakes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from infra.cli import backfill as _cli_backfill
from tests.unit.infra.ops.test_backfill import fake_target


def args(**values: object) -> argparse.Namespace:
    defaults = dict(
        source="gs://images/photos", list=None, model=None, version="1", per_message=2,
        max_in_flight=100, poll=0.01, timeout=5.0, resubmit_after=1800.0, no_wait=False,
        dry_run=False, json=False, priority="bulk",
    )  # fmt: skip
    return argparse.Namespace(**(defaults | values))


@pytest.fixture
def target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    fake = fake_target(tmp_path, ["photos/a.jpg", "photos/b.jpg", "photos/bad.jpg"])
    monkeypatch.setattr(_cli_backfill, "resolve_target", lambda _: fake)
    return fake


def test_the_summary_table_counts_outcomes(target, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert _cli_backfill.cmd_submit(args()) == 2
    out, err = capsys.readouterr()
    assert "found 3 objects: publishing 3 in 2 messages, skip 0" in err
    assert "results" in err and "3/3" in err  # the progress bar's last state
    rows = {
        line.strip("│ ").split("│")[0].strip(): line for line in out.splitlines() if "│" in line
    }
    assert "2" in rows["ok"] and "1" in rows["error: not_an_image"]
    assert "3 images published in 2 messages as bulk work (0 bulk inputs shed by Serve meanwhile): done" in out


def test_dry_run_lists_what_would_be_published(target, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert _cli_backfill.cmd_submit(args(dry_run=True)) == 0
    out, _ = capsys.readouterr()
    assert "would publish 3 in 2 messages" in out and "gs://images/photos/a.jpg" in out
    assert target.publisher.bodies == []


def test_json_prints_one_object(target, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    assert _cli_backfill.cmd_submit(args(json=True)) == 2
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert (summary["ok"], summary["errors"], err) == (2, {"not_an_image": 1}, "")
