"""Object generations: a late event for a replaced upload never clobbers the newer result."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import httpx
import pytest

from infra.local.client import StackClient
from shared.gcs import GcsClient
from shared.messages import EntryPath, InferenceRequest
from shared.result_store import StoredResult, store_result
from shared.results import (
    HASHED_NAME_SEGMENT,
    MAX_OBJECT_NAME_BYTES,
    InferenceResult,
    ModelRef,
    SourceRef,
    Status,
)
from shared.uris import parse_gcs_uri
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration


def notification(client: StackClient, name: str, generation: str) -> dict:
    attributes = {
        "eventType": "OBJECT_FINALIZE",
        "bucketId": client.state.images_bucket,
        "objectId": name,
        "objectGeneration": generation,
        "payloadFormat": "JSON_API_V1",
    }
    return {
        "message": {
            "data": base64.b64encode(b"{}").decode(),
            "attributes": attributes,
            "messageId": uuid.uuid4().hex,
        },
        "subscription": "projects/triggerfish-local/subscriptions/uploads",
    }


def test_event_for_a_replaced_generation_is_dropped(client: StackClient) -> None:
    name = f"cat-{uuid.uuid4().hex[:6]}.jpg"
    _, old = client.upload(SAMPLES / "cat.jpg", name=name)
    uri, new = client.upload(SAMPLES / "coffee.jpg", name=name)  # same name: a new generation
    current = client.wait_result(str(uri), 60, generation=new)

    url = f"{client.state.upload_function_url}/projects/{client.state.project}/topics/{client.state.uploads_topic}"
    status = httpx.post(url, json=notification(client, name, old), timeout=60).status_code

    assert status == 200  # acknowledged, not retried
    after = client.find_result(str(uri))
    assert after is not None
    assert after["source"]["generation"] == new
    assert after["labels"][0]["label"] == current["labels"][0]["label"] == "espresso"


def test_an_older_result_never_overwrites_a_newer_one(client: StackClient, monkeypatch) -> None:
    for key, value in client.state.client_env().items():
        monkeypatch.setenv(key, value)
    source = parse_gcs_uri(f"gs://{client.state.images_bucket}/late-{uuid.uuid4().hex[:6]}.jpg")

    def result(generation: str, label: str) -> InferenceResult:
        request = InferenceRequest(
            uri=str(source), generation=generation, request_id=label, entry_path=EntryPath.PUBSUB
        )
        return InferenceResult(
            source=SourceRef(uri=request.uri, generation=generation),
            model=ModelRef(name="mobilenet_v2", version="1"),
            status=Status.OK,
            labels=[],
            request_id=request.request_id,
            entry_path=request.entry_path,
        )

    async def store_in_turn() -> tuple[list[StoredResult], bytes]:
        gcs = GcsClient.from_environment()
        bucket = client.state.results_bucket
        try:
            stored = [
                await store_result(gcs, bucket, result("200", "newer"), source),
                await store_result(gcs, bucket, result("100", "older"), source),
                await store_result(gcs, bucket, result("300", "newest"), source),
            ]
            body, _ = await gcs.read(parse_gcs_uri(stored[0].uri), None, 1_000_000)
            return stored, body
        finally:
            await gcs.close()

    (first, second, third), body = asyncio.run(store_in_turn())

    assert first.written and not first.superseded
    assert (second.written, second.superseded) == (False, True)
    assert third.written and third.uri == first.uri == second.uri
    stored = json.loads(body)
    assert (stored["request_id"], stored["source"]["generation"]) == ("newest", "300")


def test_a_source_name_near_the_limit_gets_a_result_name_cloud_storage_accepts(client: StackClient) -> None:
    """A valid ~1,000-byte source name would give a result name over GCS's 1,024 bytes: hashed instead."""
    name = f"long-{uuid.uuid4().hex[:6]}/" + "é" * 300 + "a" * 384 + ".jpg"  # 1,000 bytes of UTF-8
    assert len(name.encode()) == 1000
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=name)

    result = client.wait_result(str(uri), 60, generation=generation)

    object_name = result["result_uri"].removeprefix(f"gs://{client.state.results_bucket}/")
    assert len(object_name.encode()) <= MAX_OBJECT_NAME_BYTES
    assert f"/{HASHED_NAME_SEGMENT}/" in object_name
    assert result["status"] == "ok" and result["source"]["uri"] == str(uri)  # the full name, in the JSON
