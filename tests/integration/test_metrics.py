"""A real Prometheus scrape of the local stack: names, labels, and counts that match the requests sent."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.local.client import StackClient
from infra.local.stack import StackState
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

Scrape = list[tuple[str, dict[str, str], float]]
EXPORTED = {
    "ray_triggerfish_requests_total",
    "ray_triggerfish_request_duration_seconds_bucket",
    "ray_triggerfish_errors_total",
    "ray_triggerfish_inference_count_total",
    "ray_triggerfish_execution_count_total",
    "ray_triggerfish_batch_size_bucket",
    "ray_triggerfish_queue_duration_seconds_bucket",
    "ray_triggerfish_compute_duration_seconds_bucket",
    "ray_triggerfish_fetch_duration_seconds_bucket",
    "ray_triggerfish_decode_duration_seconds_bucket",
    "ray_triggerfish_model_loaded",
    "ray_triggerfish_queue_depth",
}


def scrape(url: str) -> Scrape:
    response = httpx.get(url, timeout=10)
    response.raise_for_status()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
        if s.name.startswith("ray_triggerfish_")
    ]


def total(samples: Scrape, name: str, **labels: str) -> float:
    """Sum over every series of ``name`` (all replicas and workers) that carries ``labels``."""
    return sum(
        v for n, lbl, v in samples if n == name and all(lbl.get(k) == w for k, w in labels.items())
    )


def wait_for(url: str, done: Callable[[Scrape], bool], timeout: float = 60) -> Scrape:
    """Scrape until ``done`` holds: each Ray process reports its metrics every 2 s."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(url)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(1)


def settled_scrape(url: str, timeout: float = 30) -> Scrape:
    """A scrape that no earlier request still adds to: Ray exports every ~2 s, so earlier
    tests' answers can arrive late; wait until two scrapes 3 s apart agree."""
    def counters(samples: Scrape) -> list:
        return sorted((n, sorted(labels.items()), v) for n, labels, v in samples if n.endswith("_total"))

    deadline = time.monotonic() + timeout
    previous = scrape(url)
    while True:
        time.sleep(3)
        current = scrape(url)
        if counters(current) == counters(previous) or time.monotonic() > deadline:
            return current
        previous = current


def _oip_images(stack: StackState, body: list[bytes]) -> httpx.Response:
    payload = {
        "inputs": [
            {
                "name": "image",
                "shape": [len(body)],
                "datatype": "BYTES",
                "data": [base64.b64encode(b).decode() for b in body],
            }
        ]
    }
    return httpx.post(f"{stack.serve_url}/v2/models/mobilenet_v2/infer", json=payload, timeout=120)


def test_the_endpoint_exports_every_metric_with_the_documented_labels(
    stack: StackState, client: StackClient
) -> None:
    assert stack.metrics_url.endswith("/metrics")
    client.infer(SAMPLES / "cat.jpg")
    httpx.post(
        f"{stack.serve_url}/v1/infer",
        content=b"junk",
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    uri, _ = client.upload(SAMPLES / "coffee.jpg", name=f"metrics-{uuid.uuid4().hex[:8]}.jpg")
    client.infer(str(uri))

    samples = wait_for(stack.metrics_url, lambda s: {n for n, _, _ in s} >= EXPORTED)

    assert {n for n, _, _ in samples} >= EXPORTED
    requests = [lbl for n, lbl, _ in samples if n == "ray_triggerfish_requests_total"]
    assert all({"model", "version", "entry_path", "status"} <= set(lbl) for lbl in requests)
    assert {lbl["status"] for lbl in requests} <= {"ok", "error"}
    loaded = [lbl for n, lbl, v in samples if n == "ray_triggerfish_model_loaded" and v == 1]
    assert {(lbl["model"], lbl["version"], lbl["backend"]) for lbl in loaded} >= {
        ("mobilenet_v2", "1", "onnxruntime:CPUExecutionProvider"),
        ("text_detector", "1", "onnxruntime:CPUExecutionProvider"),
    }
    assert total(samples, "ray_triggerfish_fetch_duration_seconds_count", model="mobilenet_v2") >= 1


def test_counts_match_the_requests_sent(stack: StackState, client: StackClient) -> None:
    http = {"model": "mobilenet_v2", "entry_path": "http"}
    oip = {"model": "mobilenet_v2", "entry_path": "oip"}
    before = settled_scrape(stack.metrics_url)
    ok_before = total(before, "ray_triggerfish_requests_total", **http, status="ok")
    err_before = total(before, "ray_triggerfish_requests_total", **http, status="error")
    oip_before = total(before, "ray_triggerfish_requests_total", **oip, status="ok")
    oip_err_before = total(before, "ray_triggerfish_requests_total", **oip, status="error")
    mv = {"model": "mobilenet_v2", "version": "1"}
    images_before = total(before, "ray_triggerfish_inference_count_total", **mv)

    photos = [SAMPLES / name for name in ("cat.jpg", "coffee.jpg", "rocket.jpg")]
    for i in range(6):
        assert client.infer(photos[i % 3])["results"][0]["status"] == "ok"
    for _ in range(2):
        response = httpx.post(
            f"{stack.serve_url}/v1/infer", content=b"not an image at all",
            headers={"content-type": "image/jpeg"}, timeout=60,
        )  # fmt: skip
        assert response.json()["results"][0]["error"]["reason"] == "not_an_image"
    jpeg = (SAMPLES / "cat.jpg").read_bytes()
    for batch in ([jpeg], [jpeg, jpeg], [jpeg]):
        assert _oip_images(stack, batch).status_code == 200
    assert _oip_images(stack, [b"junk"]).status_code == 400

    def settled(s: Scrape) -> bool:
        return (
            total(s, "ray_triggerfish_requests_total", **http, status="ok") - ok_before >= 6
            and total(s, "ray_triggerfish_requests_total", **http, status="error") - err_before >= 2
            and total(s, "ray_triggerfish_requests_total", **oip, status="ok") - oip_before >= 3
            and total(s, "ray_triggerfish_requests_total", **oip, status="error") - oip_err_before
            >= 1
            # The model replica reports on its own schedule.
            and total(s, "ray_triggerfish_inference_count_total", **mv) - images_before >= 6 + 4
        )

    after = wait_for(stack.metrics_url, settled)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("ray_triggerfish_requests_total", **http, status="ok") == 6
    assert delta("ray_triggerfish_requests_total", **http, status="error") == 2
    assert delta("ray_triggerfish_request_duration_seconds_count", **http) == 8
    assert delta("ray_triggerfish_requests_total", **oip, status="ok") == 3
    assert delta("ray_triggerfish_requests_total", **oip, status="error") == 1
    # Two error records on /v1/infer, one refused Open Inference Protocol call.
    assert delta("ray_triggerfish_errors_total", model="mobilenet_v2", reason="not_an_image") == 3
    assert delta("ray_triggerfish_decode_duration_seconds_count", model="mobilenet_v2") >= 6 + 4

    images = delta("ray_triggerfish_inference_count_total", **mv)
    executions = delta("ray_triggerfish_execution_count_total", **mv)
    assert images >= 6 + 4  # and more if anything else ran meanwhile
    assert 1 <= executions <= images
    # The batch-size histogram and the two counters describe the same executions. (Its
    # _sum is not compared: Ray exports each observation at its bucket's midpoint.)
    assert delta("ray_triggerfish_batch_size_count", **mv) == executions
    assert delta("ray_triggerfish_batch_size_bucket", **mv, le="+Inf") == executions
    assert delta("ray_triggerfish_queue_duration_seconds_count", **mv) == images
    assert delta("ray_triggerfish_compute_duration_seconds_count", **mv) == executions
    assert np.isfinite(total(after, "ray_triggerfish_queue_depth", model="mobilenet_v2"))
