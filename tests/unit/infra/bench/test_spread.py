"""infra/bench/spread.py: the median and range of the headline figures over several reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from infra.bench.spread import main, spread


def _report(upload_over_reduced: float, upload_rate: float, large: bool = False) -> dict[str, Any]:
    rows = [{"path": "upload", "images_per_s": upload_rate, "cpu_ms_per_image": 10.0}]
    ratios = {"over_peer_reduced": {"upload": upload_over_reduced}, "pubsub_1_uri_over_http": 0.9,
              "serve_cpu_ms_upload": 8.0, "peer_pipeline_cpu_ms_reduced": None}  # fmt: skip
    report = {"small": rows, "ratios": {"small": ratios}}
    if large:
        report["large"] = rows
        report["ratios"]["large"] = ratios
    return report


def test_each_figure_gets_its_median_min_max_and_how_many_runs_had_it() -> None:
    summary = spread([_report(1.2, 100.0), _report(0.9, 140.0, large=True), _report(1.0, 120.0)])

    ratio = summary["small"]["upload / reduced-decode peer"]
    assert ratio == {"median": 1.0, "min": 0.9, "max": 1.2, "runs": 3}
    assert summary["small"]["upload: images/s"]["median"] == 120.0
    assert summary["large"]["upload / reduced-decode peer"]["runs"] == 1
    assert "peer_pipeline_cpu_ms_reduced" not in summary["small"]  # absent (None) in every run


def test_the_command_reads_reports_and_names_an_unreadable_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = []
    for i, value in enumerate((1.1, 1.3, 1.2)):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(_report(value, 100.0)))

    assert main([str(f) for f in files]) == 0
    out = capsys.readouterr().out
    assert "upload / reduced-decode peer" in out and "1.20  (1.10 to 1.30, 3 runs)" in out

    (tmp_path / "bad.json").write_text("{")
    assert main([str(tmp_path / "bad.json")]) == 1
    assert "bad.json" in capsys.readouterr().err
