"""A real photo through each entry path of a real local stack, checked in GCS."""

from __future__ import annotations

import base64
import json
import time
import uuid

import httpx
import pytest

from infra.local.client import StackClient
from shared.gcs_limits import object_name_problem
from shared.results import invalid_source_object_name
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

# ImageNet classes 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
CAT_CLASSES = range(281, 286)


def unique(name: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return f"{stem}-{uuid.uuid4().hex[:8]}{dot}{ext}"


def assert_cat(result: dict) -> None:
    assert result["status"] == "ok", result
    assert result["labels"][0]["class_id"] in CAT_CLASSES, result["labels"]
    assert result["backend"] == "onnxruntime:CPUExecutionProvider"
    assert result["timings"]["batch_size"] >= 1
    assert result["timings"]["end_to_end_ms"] > 0


def test_bucket_upload_writes_a_cat_result(client: StackClient) -> None:
    name = unique("cat.jpg")
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=name)

    result = client.wait_result(str(uri), 90, generation=generation)

    assert_cat(result)
    assert result["entry_path"] == "upload"
    assert result["source"] == {"uri": str(uri), "generation": generation}
    assert result["model"] == {"name": "mobilenet_v2", "version": "1"}
    assert result["result_uri"] == (
        f"gs://{client.state.results_bucket}/mobilenet_v2/{client.state.images_bucket}/{name}.json"
    )


def test_pubsub_message_writes_a_cat_result(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=unique("cat.jpg"))
    client.wait_result(str(uri), 90, generation=generation)  # let the upload's result land first

    _, request_id = client.publish([str(uri)], model="mobilenet_v2")
    result = client.wait_result(str(uri), 90, request_id=request_id)

    assert_cat(result)
    assert result["entry_path"] == "pubsub"
    assert result["source"]["generation"] == generation


def test_http_infer_with_a_gs_uri_and_with_raw_bytes(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=unique("cat.jpg"))
    client.wait_result(str(uri), 90, generation=generation)

    by_uri = client.infer(str(uri))["results"][0]
    by_bytes = client.infer(SAMPLES / "cat.jpg")["results"][0]

    for result in (by_uri, by_bytes):
        assert_cat(result)
        assert result["entry_path"] == "http"
    stored = client.find_result(str(uri), request_id=by_uri["request_id"])
    assert stored is not None and stored["labels"] == by_uri["labels"]
    assert by_bytes["source"]["uri"].startswith("sha256:")
    assert by_bytes["result_uri"].endswith(".json")


def test_duplicate_deliveries_leave_exactly_one_result(client: StackClient) -> None:
    name = unique("coffee.jpg")
    uri, generation = client.upload(SAMPLES / "coffee.jpg", name=name)
    client.wait_result(str(uri), 90, generation=generation)
    body = json.dumps({"uri": str(uri), "request_id": "dup-1"}).encode()
    push = {
        "message": {"data": base64.b64encode(body).decode(), "messageId": "dup-msg", "attributes": {}},
        "subscription": f"projects/{client.state.project}/subscriptions/requests",
    }
    endpoint = f"{client.state.request_function_url}/projects/{client.state.project}/topics/{client.state.requests_topic}"

    # The same message delivered three times (what Pub/Sub does on a lost ack) and published twice.
    statuses = [httpx.post(endpoint, json=push, timeout=60).status_code for _ in range(3)]
    client.publish([str(uri)], request_id="dup-1")
    client.publish([str(uri)], request_id="dup-1")
    client.wait_result(str(uri), 90, request_id="dup-1")

    assert statuses == [200, 200, 200]
    results_bucket = client.storage.bucket(client.state.results_bucket)
    stored = [b.name for b in client.storage.list_blobs(results_bucket) if b.name.endswith(f"/{name}.json")]
    assert stored == [f"mobilenet_v2/{client.state.images_bucket}/{name}.json"]
    assert json.loads(results_bucket.blob(stored[0]).download_as_bytes())["status"] == "ok"


def test_a_second_model_serves_side_by_side_on_every_path(client: StackClient) -> None:
    uri, generation = client.upload(
        SAMPLES / "text.jpg", name=unique("text.jpg"), model="text_detector"
    )
    uploaded = client.wait_result(str(uri), 90, model="text_detector", generation=generation)
    _, request_id = client.publish([str(uri)], model="text_detector")
    published = client.wait_result(str(uri), 90, model="text_detector", request_id=request_id)
    posted = client.infer(SAMPLES / "text.jpg", model="text_detector")["results"][0]
    classified = client.infer(str(uri), model="mobilenet_v2")["results"][0]

    for result in (uploaded, published, posted):
        assert result["status"] == "ok", result
        assert result["model"]["name"] == "text_detector"
        assert len(result["detections"]) >= 5
        for box in result["detections"]:
            assert 0 <= box["ymin"] < box["ymax"] <= 1 and 0 <= box["xmin"] < box["xmax"] <= 1
            assert box["label"] == "text" and "class" in box
    assert classified["labels"] and classified["model"]["name"] == "mobilenet_v2"


def test_concurrent_requests_form_batches(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "rocket.jpg", name=unique("rocket.jpg"))
    client.wait_result(str(uri), 90, generation=generation)

    async def burst() -> list[httpx.Response]:
        import asyncio

        async with httpx.AsyncClient(timeout=120) as http:
            calls = [http.post(f"{client.state.serve_url}/v1/infer", json={"uri": str(uri)}) for _ in range(32)]
            return await asyncio.gather(*calls)

    import asyncio

    responses = asyncio.run(burst())
    stats = httpx.get(f"{client.state.serve_url}/v1/stats", timeout=30).json()

    assert all(r.status_code == 200 for r in responses)
    # Each answer says where its time went: admission wait, work after it, and the result write.
    for response in responses:
        timing = dict(entry.strip().split(";dur=") for entry in response.headers["server-timing"].split(","))
        assert set(timing) == {"store", "admission", "work"}, timing
        assert 0 < float(timing["store"]) <= float(timing["work"]), timing
    sizes = [r.json()["results"][0]["timings"]["batch_size"] for r in responses]
    assert max(sizes) > 1, sizes
    formed = {int(k) for k in stats["mobilenet_v2"]["batch_sizes"]}
    assert max(formed) > 1 and max(formed) <= 16


def test_a_9_mb_message_gets_its_result_found_by_request_id(client: StackClient) -> None:
    """Pub/Sub takes messages up to 10 MB; the local push dispatcher must pull one too."""
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=unique("cat.jpg"))
    client.wait_result(str(uri), 90, generation=generation)
    request_id = f"big-{uuid.uuid4().hex[:12]}"
    # Valid JSON: whitespace after the document is allowed, and it makes the message 9 MB.
    body = json.dumps({"uri": str(uri), "request_id": request_id}).encode() + b" " * (9 * 1024 * 1024)

    client.publish([], raw=body)
    result = client.wait_result(str(uri), 120, request_id=request_id)

    assert_cat(result)
    assert result["entry_path"] == "pubsub"


def test_a_1000_byte_source_name_gets_a_result_cloud_storage_accepts_or_a_typed_record(
    client: StackClient,
) -> None:
    """The plain result name of a 1,000-byte source name is over Cloud Storage's 1,024 bytes."""
    stem = f"long-{uuid.uuid4().hex[:8]}/"
    name = stem + "n" * (1000 - len(stem) - len(".jpg")) + ".jpg"
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=name)
    request_id = f"{uri.bucket}/{uri.name}#{generation}"  # the upload path's request id
    bucket = client.storage.bucket(client.state.results_bucket)
    record_name = invalid_source_object_name(request_id, str(uri))

    deadline = time.monotonic() + 120
    result = record = None
    while result is None and record is None and time.monotonic() < deadline:
        result = client.find_result(str(uri), generation=generation)
        blob = bucket.get_blob(record_name)
        record = json.loads(blob.download_as_bytes()) if blob is not None else None
        time.sleep(0.25)

    if result is not None:  # stored under a name Cloud Storage accepts
        assert_cat(result)
        assert object_name_problem(result["result_uri"].removeprefix(f"gs://{bucket.name}/")) is None
    else:  # or refused by Cloud Storage, and recorded by request id instead of retried
        assert record is not None, "neither a result nor a record"
        assert record["status"] == "error" and record["error"]["reason"] == "invalid_uri", record
        assert record["request_id"] == request_id
