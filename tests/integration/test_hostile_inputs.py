"""Hostile input through all three entry paths of the real local stack.

Every kind ends as a typed error record (or a correct result) in the results
bucket, the functions acknowledge it on the first delivery (a 2xx, so Pub/Sub
never redelivers a poison message), the HTTP ingress answers 4xx instead of 5xx,
and afterwards the service is healthy with the same replica processes it started
with. Messages are pushed straight to the function URLs in the stack state, in the
Pub/Sub push format, so each delivery's answer is observed directly.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.local.client import StackClient
from infra.local.stack import StackState
from shared.messages import MODEL_METADATA_KEY
from shared.results import invalid_source_object_name
from tests.data.hostile_images import IMAGES, noise
from tests.integration.conftest import MAX_IMAGE_BYTES, QUIET_BUCKET, SAMPLES

pytestmark = pytest.mark.integration

MODEL = "mobilenet_v2"
REPLICAS = ("ServeReplica:triggerfish:Ingress", f"ServeReplica:triggerfish:Model_{MODEL}")
IMAGES_BUCKET = "triggerfish-images"
GOOD_URI = f"gs://{IMAGES_BUCKET}/cat.jpg"


# -- delivery ------------------------------------------------------------------------------
def push_body(data: bytes | str, message_id: str, attributes: dict[str, str] | None = None) -> dict:
    """A Pub/Sub push request body; ``data`` as str is sent verbatim (e.g. invalid base64)."""
    encoded = data if isinstance(data, str) else base64.b64encode(data).decode()
    return {
        "message": {"data": encoded, "messageId": message_id, "attributes": attributes or {}},
        "subscription": "projects/triggerfish-local/subscriptions/hostile",
    }


def deliver_request(state: StackState, data: bytes | str, message_id: str) -> int:
    url = f"{state.request_function_url}/projects/{state.project}/topics/{state.requests_topic}"
    return httpx.post(url, json=push_body(data, message_id), timeout=90).status_code


def deliver_upload(
    state: StackState, attributes: dict[str, str], data: bytes, message_id: str
) -> int:
    url = f"{state.upload_function_url}/projects/{state.project}/topics/{state.uploads_topic}"
    return httpx.post(url, json=push_body(data, message_id, attributes), timeout=90).status_code


def finalize(
    state: StackState, name: str, generation: str, metadata: dict | None = None, bucket: str | None = None
) -> tuple[dict, bytes]:
    """Attributes and payload of a Cloud Storage OBJECT_FINALIZE notification (default: the images bucket)."""
    bucket = bucket or state.images_bucket
    attributes = {
        "eventType": "OBJECT_FINALIZE",
        "bucketId": bucket,
        "objectId": name,
        "objectGeneration": generation,
        "payloadFormat": "JSON_API_V1",
    }
    resource = {"bucket": bucket, "name": name, "generation": generation}
    if metadata is not None:
        resource["metadata"] = metadata
    return attributes, json.dumps(resource).encode()


def message_id() -> str:
    return f"hostile-{uuid.uuid4().hex}"


def infer(state: StackState, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{state.serve_url}/v1/infer", timeout=90, **kwargs)


# -- records -------------------------------------------------------------------------------
def read_result_uri(client: StackClient, result_uri: str) -> dict:
    bucket, _, name = result_uri.removeprefix("gs://").partition("/")
    blob = client.storage.bucket(bucket).get_blob(name)
    assert blob is not None, f"no result object {result_uri}"
    return json.loads(blob.download_as_bytes())


def unparsable_record(client: StackClient, mid: str) -> dict:
    """The record of a message that could not be parsed at all."""
    name = invalid_source_object_name(mid, f"pubsub-message:{mid}")
    return read_result_uri(client, f"gs://{client.state.results_bucket}/{name}")


def reason(result: dict) -> str:
    if result["status"] == "ok":
        assert result.get("labels"), result
        return "ok"
    assert result["status"] == "error", result
    assert result["error"]["message"], result
    return result["error"]["reason"]


def unique(stem: str, suffix: str = ".jpg") -> str:
    return f"hostile/{stem}-{uuid.uuid4().hex[:8]}{suffix}"


# -- replica processes -----------------------------------------------------------------------
def _session_processes(sid: int) -> dict[int, str]:
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[3]) == sid:
            found[int(entry.name)] = cmdline
    return found


def replica_pids(state: StackState) -> dict[str, list[int]]:
    """Process ids of the Serve replicas of this stack (Ray workers share Serve's session)."""
    processes = _session_processes(state.process_groups["serve"])
    return {name: sorted(p for p, cmd in processes.items() if name in cmd) for name in REPLICAS}


@pytest.fixture(scope="module")
def replicas_before(stack: StackState) -> dict[str, list[int]]:
    pids = replica_pids(stack)
    assert all(pids.values()), pids
    return pids


# -- 1. message bodies on the requests topic --------------------------------------------------
def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


MESSAGE_BODIES: dict[str, bytes] = {
    "not_json": b"this is not json",
    "empty_body": b"",
    "null_bytes": b"\x00" * 64,
    "invalid_utf8": b'{"uri": "gs://triggerfish-images/\xff\xfe.jpg"}',
    "json_nested_50000_arrays": b"[" * 50_000 + b"]" * 50_000,
    "json_nested_50000_objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "json_array": _json([GOOD_URI]),
    "json_null": b"null",
    "json_string": _json(GOOD_URI),
    "json_nan": b'{"uri": NaN}',
    "huge_uri_1mb": _json({"uri": f"gs://{IMAGES_BUCKET}/" + "a" * 1_000_000}),
    "huge_request_id": _json({"uri": GOOD_URI, "request_id": "r" * 100_000}),
    "uri_is_number": _json({"uri": 123}),
    "uri_is_list": _json({"uri": [GOOD_URI]}),
    "uris_is_string": _json({"uris": GOOD_URI}),
    "uris_of_objects": _json({"uris": [{"uri": GOOD_URI}]}),
    "model_is_list": _json({"uri": GOOD_URI, "model": [MODEL]}),
    "model_path_traversal": _json({"uri": GOOD_URI, "model": "../../etc/passwd"}),
    "version_with_shell": _json({"uri": GOOD_URI, "version": "1; rm -rf /"}),
    "extra_field_generation": _json({"uri": GOOD_URI, "generation": "9223372036854775000"}),
    "extra_field_entry_path": _json({"uri": GOOD_URI, "entry_path": "upload"}),
    "uris_101": _json({"uris": [f"gs://{IMAGES_BUCKET}/{i}.jpg" for i in range(101)]}),
    "uris_empty": _json({"uris": []}),
    "uri_and_uris": _json({"uri": GOOD_URI, "uris": [GOOD_URI]}),
    "neither_uri_nor_uris": _json({"model": MODEL}),
    "lone_surrogate_in_uri": b'{"uri": "gs://triggerfish-images/\\ud800.jpg"}',
    "lone_surrogate_in_request_id": b'{"uri": "gs://triggerfish-images/cat.jpg", "request_id": "\\udfff"}',
}


@pytest.mark.parametrize("kind", list(MESSAGE_BODIES))
def test_message_body_is_recorded_and_acknowledged(
    client: StackClient, replicas_before, kind: str
) -> None:
    mid = message_id()
    status = deliver_request(client.state, MESSAGE_BODIES[kind], mid)

    assert status == 200, f"{kind}: the function answered {status}: Pub/Sub would redeliver it"
    record = unparsable_record(client, mid)
    assert reason(record) == "malformed_message"
    assert (record["request_id"], record["entry_path"]) == (mid, "pubsub")


def test_message_data_that_is_not_base64_is_recorded(client: StackClient) -> None:
    mid = message_id()
    assert deliver_request(client.state, "%%% not base64 %%%", mid) == 200
    assert reason(unparsable_record(client, mid)) == "malformed_message"


# -- 2. URIs ---------------------------------------------------------------------------------
BAD_URIS: dict[str, tuple[str, set[str]]] = {
    "https_scheme": ("https://example.com/cat.jpg", {"invalid_uri"}),
    "s3_scheme": (f"s3://{IMAGES_BUCKET}/cat.jpg", {"invalid_uri"}),
    "file_scheme": ("file:///etc/passwd", {"invalid_uri"}),
    "uppercase_bucket": ("gs://Triggerfish-Images/cat.jpg", {"invalid_uri"}),
    "two_letter_bucket": ("gs://ab/cat.jpg", {"invalid_uri"}),
    "bucket_with_slash_dot": ("gs://./cat.jpg", {"invalid_uri"}),
    "bucket_only": (f"gs://{IMAGES_BUCKET}", {"invalid_uri"}),
    "no_object": (f"gs://{IMAGES_BUCKET}/", {"invalid_uri"}),
    "folder": (f"gs://{IMAGES_BUCKET}/photos/", {"invalid_uri"}),
    "newline_in_name": (f"gs://{IMAGES_BUCKET}/cat\n.jpg", {"invalid_uri"}),
    "carriage_return_after_bucket": (f"gs://{IMAGES_BUCKET}\r/cat.jpg", {"invalid_uri"}),
    "name_2kb": (f"gs://{IMAGES_BUCKET}/" + "n" * 2000, {"invalid_uri"}),
    "results_bucket_not_allowed": (
        "gs://triggerfish-results/mobilenet_v2/x.json",
        {"bucket_not_allowed"},
    ),
    "models_bucket_not_allowed": (
        "gs://triggerfish-models/mobilenet_v2/1/model.onnx",
        {"bucket_not_allowed"},
    ),
    "dotdot_segments": (
        f"gs://{IMAGES_BUCKET}/../triggerfish-models/mobilenet_v2/1/model.onnx",
        {"object_missing"},
    ),
    "query_string": (f"gs://{IMAGES_BUCKET}/cat.jpg?generation=1", {"object_missing"}),
    "null_byte_in_name": (f"gs://{IMAGES_BUCKET}/cat\x00.jpg", {"object_missing", "invalid_uri"}),
    "unicode_junk_name": (
        f"gs://{IMAGES_BUCKET}/\u202e\u0301\U0001f600\ufeff.jpg",
        {"object_missing"},
    ),
}


def assert_safe_path(result_uri: str) -> None:
    segments = result_uri.removeprefix("gs://").split("/")
    assert not {".", ".."} & set(segments), result_uri
    assert "" not in segments, result_uri


@pytest.mark.parametrize("kind", list(BAD_URIS))
def test_bad_uri_is_recorded(client: StackClient, kind: str) -> None:
    uri, expected = BAD_URIS[kind]
    request_id = f"hostile-uri-{uuid.uuid4().hex[:12]}"
    status = deliver_request(
        client.state, _json({"uri": uri, "request_id": request_id}), message_id()
    )

    assert status == 200, f"{kind}: the function answered {status}"
    result = client.find_result(uri, MODEL, request_id=request_id)
    assert result is not None, f"{kind}: no record for {uri!r}"
    assert reason(result) in expected
    assert result["source"]["uri"] == uri
    assert_safe_path(result["result_uri"])


def test_bad_uris_through_http_answer_per_uri(client: StackClient) -> None:
    kinds = [
        "https_scheme",
        "no_object",
        "newline_in_name",
        "results_bucket_not_allowed",
        "dotdot_segments",
    ]
    response = infer(client.state, json={"uris": [BAD_URIS[k][0] for k in kinds]})

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [reason(r) for r in results] == [min(BAD_URIS[k][1]) for k in kinds]
    for r in results:
        assert_safe_path(r["result_uri"])
        assert reason(read_result_uri(client, r["result_uri"])) == reason(r)


# -- 3. object names -------------------------------------------------------------------------
OBJECT_NAMES = {
    "dotdot_segments": "up/../../evil-{}.jpg",
    "dot_segment": "./dot-{}.jpg",
    "empty_segment": "a//b-{}.jpg",
    "percent_encoded_dotdot": "%2E%2E/pct-{}.jpg",
    "query_and_fragment": "q?x=1#frag {}.jpg",
    "unicode_bidi": "\u00fcn\u202e-{}.jpg",
}


@pytest.mark.parametrize("kind", list(OBJECT_NAMES))
def test_hostile_object_name_gets_a_contained_result(client: StackClient, kind: str) -> None:
    name = OBJECT_NAMES[kind].format(uuid.uuid4().hex[:8])
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=name)
    attributes, data = finalize(client.state, name, generation)

    assert deliver_upload(client.state, attributes, data, message_id()) == 200
    result = client.find_result(str(uri), MODEL, generation=generation)
    assert result is not None, name
    assert reason(result) == "ok"
    assert result["source"] == {"uri": str(uri), "generation": generation}
    assert_safe_path(result["result_uri"])


def test_escaped_names_never_collide(client: StackClient) -> None:
    """``..`` is stored as ``%2E%2E``; a source literally named ``%2E%2E`` must not share its result."""
    tag = uuid.uuid4().hex[:8]
    names = [f"c-{tag}/../x.jpg", f"c-{tag}/%2E%2E/x.jpg"]
    results = []
    for name, sample in zip(names, ("cat.jpg", "coffee.jpg"), strict=True):
        uri, generation = client.upload(SAMPLES / sample, name=name)
        attributes, data = finalize(client.state, name, generation)
        assert deliver_upload(client.state, attributes, data, message_id()) == 200
        results.append(client.find_result(str(uri), MODEL, generation=generation))

    assert all(r is not None and r["status"] == "ok" for r in results), results
    assert results[0]["result_uri"] != results[1]["result_uri"]
    assert results[0]["labels"][0]["label"] != results[1]["labels"][0]["label"]


# -- 4. image formats and bombs, through all three entry paths ---------------------------------
@pytest.fixture(scope="module")
def quiet_bucket(client: StackClient) -> str:
    """Objects here get only the notifications a test delivers (see QUIET_BUCKET)."""
    if client.storage.lookup_bucket(QUIET_BUCKET) is None:
        client.storage.create_bucket(QUIET_BUCKET)
    return QUIET_BUCKET


@pytest.mark.parametrize("kind", list(IMAGES))
def test_image_kind_through_every_entry_path(client: StackClient, quiet_bucket: str, kind: str) -> None:
    suffix, build, expected = IMAGES[kind]
    payload = build()
    state = client.state
    name = unique(kind, suffix)
    # In a bucket the stack does not notify: a second, late delivery of the upload would
    # replace the request leg's result (an equal rank replaces).
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=name, data=payload, bucket=quiet_bucket)

    # upload: the bucket notification
    attributes, data = finalize(state, name, generation, bucket=quiet_bucket)
    assert deliver_upload(state, attributes, data, message_id()) == 200
    uploaded = client.find_result(str(uri), MODEL, generation=generation)
    # pubsub: a request message naming the object
    request_id = f"hostile-img-{uuid.uuid4().hex[:12]}"
    assert (
        deliver_request(state, _json({"uri": str(uri), "request_id": request_id}), message_id())
        == 200
    )
    # Its own result (the request's equal rank replaced the upload's), not the upload leg's.
    requested = client.find_result(str(uri), MODEL, generation=generation, request_id=request_id)
    # http: the raw bytes as the body
    response = infer(state, content=payload, headers={"content-type": "application/octet-stream"})

    assert uploaded is not None and requested is not None, kind
    assert reason(uploaded) == reason(requested) == expected
    if not payload:
        assert response.status_code == 400, response.text  # an empty body is not a request
        return
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    assert reason(answer) == expected
    stored = read_result_uri(client, answer["result_uri"])
    assert reason(stored) == expected
    assert stored["source"]["uri"] == f"sha256:{hashlib.sha256(payload).hexdigest()}"


def test_an_upload_over_the_byte_limit_is_recorded_on_every_path(client: StackClient) -> None:
    name = unique("over-limit")
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=name, data=noise(MAX_IMAGE_BYTES + 1))
    attributes, data = finalize(client.state, name, generation)
    assert deliver_upload(client.state, attributes, data, message_id()) == 200
    uploaded = client.find_result(str(uri), MODEL, generation=generation)
    assert deliver_request(client.state, _json({"uri": str(uri)}), message_id()) == 200
    requested = client.find_result(str(uri), MODEL, generation=generation)

    assert uploaded is not None and reason(uploaded) == "image_too_large"
    assert requested is not None and reason(requested) == "image_too_large"


# -- 5. forged fields ------------------------------------------------------------------------
def _internal(**fields: Any) -> dict:
    request = {"uri": GOOD_URI, "request_id": "forged", "entry_path": "upload", **fields}
    return {"requests": [request]}


FORGED_HTTP_BODIES: dict[str, dict] = {
    "public_form_sets_generation": {"uri": GOOD_URI, "generation": "9223372036854775000"},
    "public_form_sets_entry_path": {"uri": GOOD_URI, "entry_path": "upload"},
    "generation_5000_digits": _internal(generation="9" * 5000),
    "generation_20_digits": _internal(generation="1" * 20),
    "generation_beyond_int64": _internal(generation="9999999999999999999"),
    "generation_negative": _internal(generation="-1"),
    "generation_number_not_string": _internal(generation=1795992452953045),
    "entry_path_unknown": _internal(entry_path="admin"),
    "requests_empty": {"requests": []},
    "requests_not_a_list": {"requests": {"uri": GOOD_URI}},
    "requests_101": {"requests": [_internal()["requests"][0]] * 101},
    "request_extra_field": _internal(status="ok"),
}


@pytest.mark.parametrize("kind", list(FORGED_HTTP_BODIES))
def test_forged_fields_are_refused_with_400(client: StackClient, kind: str) -> None:
    response = infer(client.state, json=FORGED_HTTP_BODIES[kind])
    assert response.status_code == 400, f"{kind}: {response.status_code} {response.text[:300]}"
    assert response.json()["error"] == "bad_request"


def test_public_form_records_the_generation_it_read(client: StackClient) -> None:
    uri, generation = client.upload(SAMPLES / "coffee.jpg", name=unique("public"))
    response = infer(client.state, json={"uri": str(uri)})

    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    assert answer["source"] == {"uri": str(uri), "generation": generation}
    assert answer["entry_path"] == "http"


FORGED_NOTIFICATIONS = {
    "generation_5000_digits": {"objectGeneration": "9" * 5000},
    "generation_not_a_number": {"objectGeneration": "abc"},
    "generation_negative": {"objectGeneration": "-5"},
    "no_event_type": {"eventType": None},
    "no_object_id": {"objectId": None},
}


@pytest.mark.parametrize("kind", list(FORGED_NOTIFICATIONS))
def test_forged_notification_is_recorded_and_acknowledged(client: StackClient, kind: str) -> None:
    attributes, _ = finalize(client.state, unique("forged"), "1")
    for key, value in FORGED_NOTIFICATIONS[kind].items():
        if value is None:
            attributes.pop(key)
        else:
            attributes[key] = value
    mid = message_id()

    assert deliver_upload(client.state, attributes, b"", mid) == 200
    record = unparsable_record(client, mid)
    assert reason(record) == "malformed_message"
    assert record["entry_path"] == "upload"


def test_forged_model_metadata_is_recorded(client: StackClient) -> None:
    name = unique("forged-model")
    _, generation = client.upload(SAMPLES / "cat.jpg", name=name)
    attributes, data = finalize(
        client.state, name, generation, metadata={MODEL_METADATA_KEY: "../../x"}
    )
    mid = message_id()

    assert deliver_upload(client.state, attributes, data, mid) == 200
    assert reason(unparsable_record(client, mid)) == "malformed_message"


def test_a_delete_notification_is_acknowledged_without_work(client: StackClient) -> None:
    name = unique("deleted")
    attributes, data = finalize(client.state, name, "1")
    attributes["eventType"] = "OBJECT_DELETE"

    assert deliver_upload(client.state, attributes, data, message_id()) == 200
    assert client.find_result(f"gs://{IMAGES_BUCKET}/{name}", MODEL) is None


def test_internal_form_cannot_plant_a_future_generation(client: StackClient) -> None:
    name = unique("future")
    uri, _ = client.upload(SAMPLES / "cat.jpg", name=name)
    forged = _internal(uri=str(uri), generation="9223372036854775000")
    infer(client.state, json=forged)
    _, generation = client.upload(SAMPLES / "coffee.jpg", name=name)
    attributes, data = finalize(client.state, name, generation)

    assert deliver_upload(client.state, attributes, data, message_id()) == 200
    result = client.find_result(str(uri), MODEL)
    assert result is not None and result["source"]["generation"] == generation, result


DEADLINE_HEADERS = {
    "nan": "nan",
    "inf": "inf",
    "negative": "-5",
    "zero": "0",
    "milliseconds": "1800000000000",
    "exponent": "1e9",
    "not_a_number": "abc",
    "digits_5000": "9" * 5000,
    "hex": "0x10",
}


@pytest.mark.parametrize("kind", list(DEADLINE_HEADERS))
def test_hostile_deadline_header_is_a_400_naming_it(client: StackClient, kind: str) -> None:
    response = infer(
        client.state,
        json={"uri": GOOD_URI},
        headers={"x-triggerfish-deadline": DEADLINE_HEADERS[kind]},
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad_deadline"
    assert "x-triggerfish-deadline" in response.json()["message"]


def test_hostile_and_short_deadlines_alongside_normal_traffic_fail_none_of_it(client: StackClient) -> None:
    """Merged into the same model calls as normal callers, hostile or short deadlines cut nothing short."""
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=unique("deadline-mix"))
    normal_calls, rounds = 24, 3

    def normal(_: int) -> httpx.Response:
        return infer(client.state, json={"uri": str(uri)})

    def hostile(i: int) -> httpx.Response:
        kinds = list(DEADLINE_HEADERS.values())
        # Valid but short deadlines too: they join the same merged calls as the normal ones.
        header = kinds[i % len(kinds)] if i % 3 else f"{time.time() + 2.05:.3f}"
        sent = time.time()
        try:
            return infer(client.state, json={"uris": [str(uri)] * 4}, headers={"x-triggerfish-deadline": header})
        except httpx.TimeoutException as err:  # every such call is answered within seconds: say which hung
            raise AssertionError(f"no answer for deadline header {header[:40]!r} sent at {sent:.3f}") from err

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(normal, i) for i in range(normal_calls)]
        others = [pool.submit(hostile, i) for i in range(rounds * len(DEADLINE_HEADERS))]
        answers = [f.result() for f in futures]
        hostile_statuses = {f.result().status_code for f in others}

    assert [a.status_code for a in answers] == [200] * normal_calls, [a.text[:200] for a in answers]
    for answer in answers:
        [result] = answer.json()["results"]
        assert reason(result) == "ok" and result["source"]["generation"] == generation
    assert hostile_statuses <= {200, 400, 503}, hostile_statuses


# -- 6. oversize and malformed HTTP bodies ---------------------------------------------------------
HTTP_BODIES: dict[str, bytes] = {
    "not_json": b"this is not json",
    "json_nested_50000": b"[" * 50_000 + b"]" * 50_000,
    "json_array": _json([GOOD_URI]),
    "uris_101": MESSAGE_BODIES["uris_101"],
    "uri_is_number": MESSAGE_BODIES["uri_is_number"],
    "invalid_utf8": MESSAGE_BODIES["invalid_utf8"],
}


@pytest.mark.parametrize("kind", list(HTTP_BODIES))
def test_malformed_http_body_answers_400(client: StackClient, kind: str) -> None:
    response = infer(
        client.state, content=HTTP_BODIES[kind], headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, f"{kind}: {response.status_code} {response.text[:300]}"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_raw_body_over_the_limit_with_a_length_answers_413(client: StackClient) -> None:
    response = infer(
        client.state, content=noise(MAX_IMAGE_BYTES + 1), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "image_too_large"


STREAMED_BODY_BYTES = 200_000_000


def _streamed(total: int, head: bytes = b"") -> Iterator[bytes]:
    """``head`` and then filler up to ``total`` bytes, in 64 KiB chunks (no Content-Length)."""
    yield head
    sent, chunk = len(head), b" " * (1 << 16)
    while sent < total:
        sent += len(chunk)
        yield chunk


def _peak_growth_mb(pid: int, action: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    """Run ``action`` while sampling ``pid``'s resident memory; the answer and the peak growth."""
    before, samples, done = _rss_mb(pid), [], threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_mb(pid))
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = action()
    finally:
        done.set()
        sampler.join()
    return response, max(samples, default=before) - before


@pytest.mark.parametrize(
    ("content_type", "head"),
    [
        ("image/jpeg", b"\xff\xd8\xff"),
        ("application/json", b'{"uri": "' + GOOD_URI.encode() + b'"'),
    ],
    ids=["raw_image", "json"],
)
def test_streamed_body_over_the_limit_answers_413_without_buffering(
    client: StackClient, content_type: str, head: bytes
) -> None:
    [ingress] = replica_pids(client.state)[REPLICAS[0]]
    body = _streamed(STREAMED_BODY_BYTES, head)

    response, grown = _peak_growth_mb(
        ingress, lambda: infer(client.state, content=body, headers={"content-type": content_type})
    )

    assert response.status_code == 413, response.text[:300]
    # The ingress stops reading past its limit: it never holds the 200 MB body.
    assert grown < STREAMED_BODY_BYTES / 2**20 / 2, f"the Ingress replica grew {grown:.0f} MB"


def test_raw_body_at_the_limit_is_recorded(client: StackClient) -> None:
    response = infer(
        client.state, content=noise(MAX_IMAGE_BYTES), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text
    [answer] = response.json()["results"]
    assert reason(answer) == reason(read_result_uri(client, answer["result_uri"])) == "not_an_image"


# -- 7. through the real emulator: one delivery per poison message ------------------------------
def _log_path(state: StackState, process: str) -> Path:
    return Path(os.readlink(f"/proc/{state.process_groups[process]}/fd/1"))


def _log_size(state: StackState, process: str) -> int:
    return _log_path(state, process).stat().st_size


def _log_since(state: StackState, process: str, offset: int) -> str:
    with _log_path(state, process).open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def test_poison_published_through_pubsub_is_delivered_once(client: StackClient) -> None:
    state = client.state
    offsets = {p: _log_size(state, p) for p in ("fn-on-request", "push-dispatcher")}
    kinds = ["not_json", "json_nested_50000_arrays", "uris_101", "lone_surrogate_in_uri"]
    published = {kind: client.publish([], raw=MESSAGE_BODIES[kind])[0] for kind in kinds}
    for kind, mid in published.items():
        record = client.wait_result(f"pubsub-message:{mid}", 60, request_id=mid)
        assert reason(record) == "malformed_message", kind
    time.sleep(1)  # the dispatcher logs a failed delivery as soon as the function answers

    recorded = _log_since(state, "fn-on-request", offsets["fn-on-request"])
    failures = _log_since(state, "push-dispatcher", offsets["push-dispatcher"])
    records = {
        kind: recorded.count(invalid_source_object_name(mid, f"pubsub-message:{mid}"))
        for kind, mid in published.items()
    }
    assert records == dict.fromkeys(kinds, 1), records
    assert not [k for k, mid in published.items() if f"of message {mid} " in failures], failures


# -- 8. afterwards ---------------------------------------------------------------------------
def test_service_is_healthy_with_the_same_replicas_afterwards(
    client: StackClient, replicas_before
) -> None:
    health = httpx.get(f"{client.state.serve_url}/healthz", timeout=30)
    stats = httpx.get(f"{client.state.serve_url}/v1/stats", timeout=30).json()[MODEL]

    assert health.status_code == 200, health.text
    assert stats["healthy"] is True and stats["default_version"] == "1", stats
    assert replica_pids(client.state) == replicas_before  # no hostile input crashed a replica
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=unique("after"))
    assert reason(client.wait_result(str(uri), 60, generation=generation)) == "ok"
