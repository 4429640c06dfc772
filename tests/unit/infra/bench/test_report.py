"""The bench report's arithmetic: the peer's best worker count, warm or cold, agreement, ratios."""

from __future__ import annotations

from typing import Any

import pytest

from infra.bench.peer import peer_row
from infra.bench.report import PEER_FULL, PEER_REDUCED, format_report, ratios


def _run(workers: int, warm: float | None, cold: float, top1: dict[str, int | None]) -> dict[str, Any]:
    ok = sum(1 for c in top1.values() if c is not None)
    return {
        "workers": workers, "results": len(top1), "ok": ok, "warm_seconds": ok / warm if warm else -0.5,
        "cold_seconds": ok / cold, "images_per_s": warm, "cold_images_per_s": cold,
        "cpu_seconds": {"beam": 2.0, "fake-gcs-server": 0.5}, "cold_cpu_seconds": {"beam": 4.0, "fake-gcs-server": 1.0},
        "warm_ok": ok - 1, "top1": top1,
    }  # fmt: skip


def test_the_peer_row_takes_the_faster_warm_worker_count_and_compares_top1() -> None:
    top1 = {"00000.jpg": 285, "00001.jpg": 967, "00002.jpg": 1}
    reference = {"00000.jpg": 285, "00001.jpg": 967, "00002.jpg": 2}
    row = peer_row("reduced", 3, {"1": _run(1, 10.0, 8.0, top1), "2": _run(2, 15.0, 6.0, top1)}, reference)

    assert row["path"] == PEER_REDUCED and row["timing"] == "warm" and row["workers"] == 2
    assert row["images_per_s"] == 15.0
    assert row["images_per_s_by_workers"] == {"1": 10.0, "2": 15.0}
    assert row["cpu_ms_per_image"] == pytest.approx(2500 / 2)  # over the warm run's ok results
    assert row["top1_compared"] == 3 and row["top1_agreement"] == pytest.approx(2 / 3)


def test_without_a_measurable_warm_difference_the_peer_row_says_it_is_cold() -> None:
    top1 = {"00000.jpg": 285, "00001.jpg": None}
    row = peer_row("full", 2, {"1": _run(1, None, 4.0, top1), "2": _run(2, None, 5.0, top1)}, {"00000.jpg": 285})

    assert row["path"] == PEER_FULL and row["timing"] == "cold" and row["workers"] == 2
    assert row["images_per_s"] == 5.0 and row["ok"] == 1
    assert row["cpu_ms_per_image"] == pytest.approx(5000 / 1)  # the whole run's CPU over its ok results
    assert row["top1_compared"] == 1 and row["top1_agreement"] == 1.0


def _path(name: str, rate: float, serve_ms: float = 8.0) -> dict[str, Any]:
    return {
        "path": name, "images": 10, "results": 10, "ok": 10, "images_per_s": rate, "cpu_ms_per_image": 12.0,
        "cpu_ms_by_process": {"serve": serve_ms}, "cores_busy": 1.5, "latency_ms_p50": 100.0,
        "latency_ms_p95": 200.0, "batches_formed": {"16": 1},
    }  # fmt: skip


def _rows() -> list[dict[str, Any]]:
    top1 = {"00000.jpg": 285}
    return [
        _path("upload", 100.0),
        _path("pubsub, 1 URI/message", 90.0),
        _path("pubsub, 16 URIs/message", 120.0),
        _path("HTTP, 16 URIs/call, 4 in flight", 150.0),
        peer_row("full", 1, {"1": _run(1, 25.0, 20.0, top1)}, top1),
        peer_row("reduced", 1, {"1": _run(1, 50.0, 40.0, top1)}, top1),
    ]


def test_headline_ratios_are_against_the_reduced_decode_peer_and_the_full_decode_is_context() -> None:
    q = ratios(_rows())

    assert q["over_peer_reduced"]["upload"] == pytest.approx(2.0)
    assert q["over_peer_reduced"]["HTTP, 16 URIs/call, 4 in flight"] == pytest.approx(3.0)
    assert q["over_peer_full"]["upload"] == pytest.approx(4.0)
    assert q["pubsub_1_uri_over_http"] == pytest.approx(0.6)
    assert q["serve_cpu_ms_upload"] == 8.0 and q["peer_pipeline_cpu_ms_reduced"] == 2000.0


def test_the_text_report_quotes_the_reduced_peer_first_and_the_agreement() -> None:
    rows = _rows()
    report = {
        "started_at": "now", "cpus": 2, "small": rows, "ratios": {"small": ratios(rows)},
        "ceilings": {"small": {"engine_images_per_s": 400.0, "engine_batch_size": 16, "backend": "onnxruntime:CPU",
                               "decode_images_per_s": 900.0, "decode_threads": 2, "engine_batch1_ms_p50": 4.0}},
        "single_image_http_ms_p50": 12.0,
    }  # fmt: skip
    text = format_report(report)

    reduced = text.index("against the reduced-decode peer: upload 2.00x")
    assert reduced < text.index("against the full-decode peer (context): upload 4.00x")
    assert "HTTP 16/call 3.00x" in text and "pubsub 16/message 2.40x" in text
    assert "peer top-1 agreement with triggerfish (1 objects): full decode 1.000, reduced-scale decode 1.000" in text
    assert "warm, 1 worker(s)" in text


def test_without_the_peer_the_report_has_no_peer_ratios() -> None:
    rows = _rows()[:4]
    q = ratios(rows)
    assert set(q) == {"pubsub_1_uri_over_http"}
    report = {
        "started_at": "now", "cpus": 2, "small": rows, "ratios": {"small": q}, "peer_skipped": ".venv-bench is missing",
        "ceilings": {"small": {"engine_images_per_s": 400.0, "engine_batch_size": 16, "backend": "onnxruntime:CPU",
                               "decode_images_per_s": 900.0, "decode_threads": 2, "engine_batch1_ms_p50": 4.0}},
        "single_image_http_ms_p50": 12.0,
    }  # fmt: skip
    text = format_report(report)
    assert "the Beam peer was skipped: .venv-bench is missing" in text
    assert "against the reduced-decode peer" not in text and "agreement" not in text
    assert "pubsub 1 URI / HTTP 0.60x" in text
