"""``triggerfish bench`` end to end on a few images: every figure the report promises is there.

Only the report's shape and counts are checked: timing belongs in the benchmark, not in tests.
"""

from __future__ import annotations

import argparse
import os

import pytest

from infra.bench.entry_paths import format_report, run_bench

pytestmark = pytest.mark.integration


def test_a_small_bench_run_reports_every_path_with_its_costs() -> None:
    args = argparse.Namespace(
        images=24, large_images=0, per_message=4, http_in_flight=2, small_only=True, no_beam=True,
        json=True, out=None,
    )  # fmt: skip

    # The bench's stack client points PUBSUB_EMULATOR_HOST at its own emulator, which stops
    # with it: afterwards the other tests' clients must find the session stack's again.
    saved = os.environ.get("PUBSUB_EMULATOR_HOST")
    try:
        report = run_bench(args)
    finally:
        if saved is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = saved

    paths = [row["path"] for row in report["small"]]
    assert paths == ["upload", "pubsub, 1 URI/message", "pubsub, 4 URIs/message", "HTTP, 4 URIs/call, 2 in flight"]
    for row in report["small"]:
        assert row["results"] == row["images"] == 24, row
        assert row["cpu_ms_per_image"] > 0 and row["cores_busy"] > 0, row
        assert set(row["cpu_ms_by_process"]) >= {"serve", "pubsub", "fake-gcs-server", "push-dispatcher"}, row
        assert sum(int(size) * n for size, n in row["batches_formed"].items()) >= 24, row
        assert row["latency_ms_p95"] >= row["latency_ms_p50"] > 0, row
    ceilings = report["ceilings"]["small"]
    assert ceilings["engine_images_per_s"] > 0 and ceilings["decode_images_per_s"] > 0
    assert ceilings["backend"] == "onnxruntime:CPUExecutionProvider"
    assert report["single_image_http_ms_p50"] > 0 and report["single_image_proxy_ms_p50"] > 0
    text = format_report(report)
    assert "ratios: pubsub 1 URI / HTTP" in text and "single image over HTTP (raw body)" in text
