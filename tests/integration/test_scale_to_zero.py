"""Scale to zero on a real local stack (``triggerfish up --scale-to-zero``).

The model deployments run with ``min_replicas: 0`` and a short idle delay. After
the delay no model replica process exists while the Ingress and the functions stay
up; then Pub/Sub messages, uploads and an HTTP call sent at zero all complete, and
the text detector stays at zero while only the classifier is used.

HTTP calls at zero follow the contract of issue 19: each is answered with a result
or with 503 and ``Retry-After`` (then retried after it), never a timeout or a 500.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from infra.cli.stack import replica_report
from infra.local.client import StackClient
from infra.local.processes import pid_alive
from infra.local.ray_cluster import replica_processes
from infra.local.stack import StackOptions, StackState
from tests.integration.conftest import SAMPLES, running_stack

pytestmark = pytest.mark.integration

IDLE_DELAY_S = 8.0
# Bounds, not expectations: how long a model may take to leave, and an HTTP call to settle.
ZERO_WITHIN_S = 150.0
HTTP_SETTLE_S = 120.0
CLASSIFIER, DETECTOR = "Model_mobilenet_v2", "Model_text_detector"
STAGING_BUCKET = "triggerfish-scale-to-zero"  # no notifications: objects for the messages


@pytest.fixture(scope="module")
def zero_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackState]:
    options = StackOptions(
        state_dir=tmp_path_factory.mktemp("zero-stack"),
        scale_to_zero=True,
        idle_delay_s=IDLE_DELAY_S,
        extra_env={"TRIGGERFISH_ALLOWED_BUCKETS": f"triggerfish-images,{STAGING_BUCKET}"},
    )
    with running_stack(options, ["mobilenet_v2", "text_detector"]) as state:
        yield state


def model_processes(state: StackState, deployment: str) -> int:
    return len(replica_processes(state.ray_sessions().values(), deployment))


def wait_for_zero(state: StackState) -> float:
    """Seconds until neither model has a replica process (fails after ZERO_WITHIN_S)."""
    started = time.monotonic()
    while time.monotonic() - started < ZERO_WITHIN_S:
        if model_processes(state, CLASSIFIER) == 0 and model_processes(state, DETECTOR) == 0:
            return time.monotonic() - started
        time.sleep(1.0)
    pytest.fail(
        f"model replicas still running after {ZERO_WITHIN_S:.0f}s: "
        f"{CLASSIFIER}={model_processes(state, CLASSIFIER)} {DETECTOR}={model_processes(state, DETECTOR)}"
    )


def wait_for_status(state: StackState, done) -> dict:  # noqa: ANN001 - a predicate
    """``triggerfish status``'s replica report once ``done(report)`` holds (bounded)."""
    deadline = time.monotonic() + 30
    report = replica_report(state)
    while not done(report) and time.monotonic() < deadline:
        time.sleep(1.0)
        report = replica_report(state)
    return report


def infer_at_zero(state: StackState, image: bytes) -> tuple[dict, list[int]]:
    """POST raw bytes until a result; every answer must be 200, or 503 with Retry-After."""
    statuses: list[int] = []
    deadline = time.monotonic() + HTTP_SETTLE_S
    while time.monotonic() < deadline:
        response = httpx.post(
            f"{state.serve_url}/v1/infer", content=image, headers={"content-type": "image/jpeg"}, timeout=HTTP_SETTLE_S
        )
        statuses.append(response.status_code)
        if response.status_code == 200:
            return response.json(), statuses
        assert response.status_code == 503, (response.status_code, response.text[:300])
        retry_after = response.headers.get("retry-after")
        assert retry_after is not None and float(retry_after) >= 0, dict(response.headers)
        time.sleep(min(float(retry_after), 5.0))
    pytest.fail(f"no result within {HTTP_SETTLE_S:.0f}s; answers: {statuses}")


def test_idle_models_leave_and_the_first_calls_bring_the_classifier_back(zero_stack: StackState) -> None:
    client = StackClient(zero_stack)
    client.storage.create_bucket(STAGING_BUCKET)
    staged = []
    for name in ("cat.jpg", "coffee.jpg", "rocket.jpg"):
        blob_name = f"{uuid.uuid4().hex[:8]}-{name}"
        client.storage.bucket(STAGING_BUCKET).blob(blob_name).upload_from_string((SAMPLES / name).read_bytes())
        staged.append(f"gs://{STAGING_BUCKET}/{blob_name}")

    wait_for_zero(zero_stack)

    # At zero: the Ingress and the functions are still there and answer.
    assert model_processes(zero_stack, "Ingress") == 1
    for name in ("fn-on-request", "fn-on-upload", "push-dispatcher"):
        assert pid_alive(zero_stack.process_groups[name]), name
    assert httpx.get(f"{zero_stack.serve_url}/v2/health/live", timeout=10).status_code == 200
    assert model_processes(zero_stack, CLASSIFIER) == 0
    # `triggerfish status` shows it too (Serve's view, published every 2 s, and the processes).
    status = wait_for_status(zero_stack, lambda r: r.get(CLASSIFIER, {}).get("running", 1) == 0)
    assert status["Ingress"] == {"running": 1, "nodes": [0], "processes": 1}
    assert status[CLASSIFIER]["processes"] == 0

    published = [client.publish([uri], model="mobilenet_v2") for uri in staged]
    uploads = [client.upload(SAMPLES / "cat.jpg", name=f"zero-{uuid.uuid4().hex[:8]}.jpg") for _ in range(2)]
    answer, statuses = infer_at_zero(zero_stack, (SAMPLES / "cat.jpg").read_bytes())

    assert answer["results"][0]["status"] == "ok", answer
    for uri, (_, request_id) in zip(staged, published, strict=True):
        assert client.wait_result(uri, 120, request_id=request_id)["status"] == "ok"
    for uri, generation in uploads:
        assert client.wait_result(str(uri), 120, generation=generation)["status"] == "ok"
    assert model_processes(zero_stack, CLASSIFIER) >= 1
    # Models scale independently: only the classifier was asked for.
    assert model_processes(zero_stack, DETECTOR) == 0
    assert set(statuses) <= {200, 503}
