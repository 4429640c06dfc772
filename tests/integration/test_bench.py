"""``triggerfish bench`` end to end on a few images: every figure the report promises is there.

Only the report's shape and counts are checked: timing belongs in the benchmark, not in tests.
The Beam peer runs when ``.venv-bench`` exists (``make bench`` creates it); otherwise the report
must say why it left the peer out.
"""

from __future__ import annotations

import argparse
import os

import pytest

from infra.bench.entry_paths import format_report, run_bench
from infra.bench.peer import BEAM_PYTHON, BEAM_WORKERS
from infra.bench.report import PEER_FULL, PEER_REDUCED

pytestmark = pytest.mark.integration


def test_a_small_bench_run_reports_every_path_with_its_costs() -> None:
    args = argparse.Namespace(
        images=24, large_images=0, per_message=4, http_in_flight=2, small_only=True, no_beam=False,
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

    ours = ["upload", "pubsub, 1 URI/message", "pubsub, 4 URIs/message", "HTTP, 4 URIs/call, 2 in flight"]
    peers = [PEER_FULL, PEER_REDUCED] if BEAM_PYTHON.exists() else []
    assert [row["path"] for row in report["small"]] == ours + peers
    for row in report["small"][:4]:
        assert row["results"] == row["ok"] == row["images"] == 24, row
        assert row["images_per_s"] > 0 and row["cpu_ms_per_image"] > 0 and row["cores_busy"] > 0, row
        assert set(row["cpu_ms_by_process"]) >= {"serve", "pubsub", "fake-gcs-server", "push-dispatcher"}, row
        assert sum(int(size) * n for size, n in row["batches_formed"].items()) >= 24, row
        assert row["latency_ms_p95"] >= row["latency_ms_p50"] > 0, row
    for row in report["small"][4:]:
        assert row["results"] == row["ok"] == row["images"] == 24, row
        assert row["timing"] in {"warm", "cold"} and row["workers"] in BEAM_WORKERS, row
        assert set(row["images_per_s_by_workers"]) == {str(w) for w in BEAM_WORKERS}, row
        assert row["images_per_s"] > 0 and set(row["cpu_ms_by_process"]) == {"beam", "fake-gcs-server"}, row
        # The peer read the HTTP path's objects: every one is compared with triggerfish's top-1.
        assert row["top1_compared"] == 24 and 0 <= row["top1_agreement"] <= 1, row
    ratios = report["ratios"]["small"]
    assert ratios["pubsub_1_uri_over_http"] > 0
    if peers:
        assert set(ratios["over_peer_reduced"]) == set(ratios["over_peer_full"]) == set(ours)
        assert ratios["serve_cpu_ms_upload"] > 0 and ratios["peer_pipeline_cpu_ms_reduced"] >= 0
    else:
        assert str(BEAM_PYTHON) in report["peer_skipped"]
    ceilings = report["ceilings"]["small"]
    assert ceilings["engine_images_per_s"] > 0 and ceilings["decode_images_per_s"] > 0
    assert ceilings["backend"] == "onnxruntime:CPUExecutionProvider"
    assert report["single_image_http_ms_p50"] > 0 and report["single_image_proxy_ms_p50"] > 0
    text = format_report(report)
    assert "pubsub 1 URI / HTTP" in text and "single image over HTTP (raw body)" in text
    assert ("against the reduced-decode peer: upload" in text) == bool(peers)
