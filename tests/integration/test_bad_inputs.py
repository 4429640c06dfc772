"""Permanent problems become one error record each and the message is acknowledged;
transient ones make the function fail so Pub/Sub redelivers."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import uuid

import httpx
import numpy as np
import pytest

from infra.local.client import StackClient
from infra.local.emulators import function_argv
from infra.local.processes import free_port, port_open, stop_group, wait_until
from infra.local.stack import REPO_ROOT, StackState
from shared.results import invalid_source_object_name
from tests.integration.conftest import MAX_IMAGE_BYTES, SAMPLES

pytestmark = pytest.mark.integration


def push_body(data: bytes, message_id: str, attributes: dict | None = None) -> dict:
    return {
        "message": {
            "data": base64.b64encode(data).decode(),
            "messageId": message_id,
            "attributes": attributes or {},
        },
        "subscription": "projects/triggerfish-local/subscriptions/test",
    }


def push(state: StackState, data: bytes, message_id: str) -> int:
    """Deliver a requests-topic message straight to the function, as a Pub/Sub push does."""
    url = f"{state.request_function_url}/projects/{state.project}/topics/{state.requests_topic}"
    return httpx.post(url, json=push_body(data, message_id), timeout=60).status_code


def error_of(result: dict) -> str:
    assert result["status"] == "error", result
    assert result["error"]["message"]
    return result["error"]["reason"]


def test_malformed_message_is_recorded_and_acknowledged(client: StackClient) -> None:
    message_id, _ = client.publish([], raw=b"this is not json")
    result = client.wait_result(f"pubsub-message:{message_id}", 60, request_id=message_id)
    status = push(client.state, b'{"uris": []}', "direct-" + uuid.uuid4().hex)

    assert error_of(result) == "malformed_message"
    assert result["result_uri"].endswith(
        invalid_source_object_name(message_id, f"pubsub-message:{message_id}")
    )
    assert status == 200  # acknowledged: Pub/Sub will not redeliver it


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("https://example.com/cat.jpg", "invalid_uri"),
        ("gs://not-an-allowed-bucket/cat.jpg", "bucket_not_allowed"),
        ("gs://triggerfish-images/no-such-object.jpg", "object_missing"),
    ],
)
def test_bad_uris_are_recorded(client: StackClient, uri: str, reason: str) -> None:
    _, request_id = client.publish([uri])
    result = client.wait_result(uri, 60, request_id=request_id)
    status = push(client.state, json.dumps({"uri": uri}).encode(), "direct-" + uuid.uuid4().hex)

    assert error_of(result) == reason
    assert result["source"]["uri"] == uri
    assert status == 200


def test_a_file_that_is_not_an_image_is_recorded(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=f"notes-{uuid.uuid4().hex[:6]}.jpg", data=b"plain text")
    result = client.wait_result(str(uri), 60, generation=generation)
    assert error_of(result) == "not_an_image"


def test_an_image_over_the_size_limit_is_recorded(client: StackClient) -> None:
    noise = np.random.default_rng(0).integers(0, 256, MAX_IMAGE_BYTES + 1, dtype=np.uint8).tobytes()
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=f"huge-{uuid.uuid4().hex[:6]}.jpg", data=noise)
    result = client.wait_result(str(uri), 60, generation=generation)
    assert error_of(result) == "image_too_large"
    assert str(MAX_IMAGE_BYTES) in result["error"]["message"]


def test_an_unknown_model_is_recorded(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "coffee.jpg", name=f"coffee-{uuid.uuid4().hex[:6]}.jpg")
    client.wait_result(str(uri), 60, generation=generation)
    _, request_id = client.publish([str(uri)], model="no_such_model")
    result = client.wait_result(str(uri), 60, model="no_such_model", request_id=request_id)
    assert error_of(result) == "unknown_model"


def test_an_unknown_version_is_answered_but_never_replaces_an_ok_result(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "coffee.jpg", name=f"coffee-{uuid.uuid4().hex[:6]}.jpg")
    stored = client.wait_result(str(uri), 60, generation=generation)
    answer = client.infer(str(uri), version="99")["results"][0]
    assert error_of(answer) == "unknown_version" and answer["superseded"] is True
    kept = client.find_result(str(uri))
    assert kept is not None and kept["status"] == "ok" and kept["request_id"] == stored["request_id"]


def test_one_bad_uri_does_not_fail_its_neighbours(client: StackClient) -> None:
    good, generation = client.upload(SAMPLES / "cat.jpg", name=f"cat-{uuid.uuid4().hex[:6]}.jpg")
    client.wait_result(str(good), 60, generation=generation)
    missing = "gs://triggerfish-images/missing-" + uuid.uuid4().hex[:6] + ".jpg"

    _, request_id = client.publish([str(good), missing, "ftp://nope"])

    assert client.wait_result(str(good), 60, request_id=f"{request_id}/0")["status"] == "ok"
    assert error_of(client.wait_result(missing, 60, request_id=f"{request_id}/1")) == "object_missing"
    assert error_of(client.wait_result("ftp://nope", 60, request_id=f"{request_id}/2")) == "invalid_uri"


def test_serve_unreachable_makes_the_function_fail_for_redelivery(stack: StackState, tmp_path) -> None:
    port = free_port()
    env = {
        **os.environ,
        **stack.client_env(),
        "TRIGGERFISH_SERVE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "TRIGGERFISH_ALLOWED_BUCKETS": stack.images_bucket,
        "TRIGGERFISH_RESULTS_BUCKET": stack.results_bucket,
    }
    with open(tmp_path / "fn.log", "wb") as log:
        fn = subprocess.Popen(
            function_argv("on_request", port), env=env, cwd=REPO_ROOT,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: port_open(port), 60, "the function")
        body = json.dumps({"uri": f"gs://{stack.images_bucket}/cat.jpg"}).encode()
        url = f"http://127.0.0.1:{port}/projects/{stack.project}/topics/{stack.requests_topic}"
        response = httpx.post(url, json=push_body(body, "transient-1"), timeout=60)
    finally:
        stop_group(fn.pid)
    assert response.status_code == 500
