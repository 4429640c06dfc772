"""Racing deliveries on the real local stack: the newest generation's result always wins.

Fifty objects are each uploaded twice back to back (generation G1 a cat, G2 an
espresso), so their two bucket notifications race through the emulator, the
upload function and Serve; then both notifications of every object are pushed
again at the same moment, the older one redelivered after the newer result, and
errors offered for G2 itself. Every stored result must stay G2's ``ok`` result,
with G2's labels: the conditional writes in ``shared.result_store`` decide, not
the order of arrival.

The images bucket has object versioning on for these tests, so G1 stays readable
after G2 replaced it: an older notification is then read, inferred and offered to
the result store, whose generation ranking has to keep G2's result. (Without
versioning a read of G1 is a 404 and the message is dropped before inference, and
the ranking would never be reached.)
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from infra.local.client import StackClient
from infra.local.stack import StackState
from shared.messages import VERSION_METADATA_KEY
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

OBJECTS = 50
MODEL = "mobilenet_v2"
NEWEST_LABEL = "espresso"  # coffee.jpg, uploaded as G2 over cat.jpg
SETTLE_S = 5.0


@dataclass(frozen=True)
class Raced:
    uri: str
    name: str
    older: str  # generation G1
    newer: str  # generation G2


def notification(
    state: StackState, name: str, generation: str, metadata: dict | None = None
) -> dict:
    """A Cloud Storage OBJECT_FINALIZE notification in the Pub/Sub push format."""
    resource = {"bucket": state.images_bucket, "name": name, "generation": generation}
    if metadata:
        resource["metadata"] = metadata
    attributes = {
        "eventType": "OBJECT_FINALIZE",
        "bucketId": state.images_bucket,
        "objectId": name,
        "objectGeneration": generation,
        "payloadFormat": "JSON_API_V1",
    }
    return {
        "message": {
            "data": base64.b64encode(json.dumps(resource).encode()).decode(),
            "messageId": uuid.uuid4().hex,
            "attributes": attributes,
        },
        "subscription": "projects/triggerfish-local/subscriptions/races",
    }


def deliver(http: httpx.Client, state: StackState, body: dict) -> int:
    url = f"{state.upload_function_url}/projects/{state.project}/topics/{state.uploads_topic}"
    return http.post(url, json=body).status_code


def in_parallel(work: Callable[[Raced], object], objects: list[Raced], workers: int = 16) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, objects))


def stored(client: StackClient, objects: list[Raced]) -> list[dict | None]:
    return in_parallel(lambda o: client.find_result(o.uri, MODEL), objects)


def assert_newest_wins(client: StackClient, objects: list[Raced]) -> None:
    wrong = {}
    for o, r in zip(objects, stored(client, objects), strict=True):
        if r is None or r["status"] != "ok" or r["source"]["generation"] != o.newer:
            wrong[o.uri] = r and (r["status"], r["source"].get("generation"), o.older, o.newer)
        elif r["labels"][0]["label"] != NEWEST_LABEL:
            wrong[o.uri] = ("labels of another generation", r["labels"][0]["label"])
    assert not wrong, f"{len(wrong)} of {len(objects)} results are not G2's ok result: {wrong}"


def wait_for_newest(client: StackClient, objects: list[Raced], timeout_s: float) -> None:
    """Until every object's stored result names its newest generation."""
    deadline = time.monotonic() + timeout_s
    pending = list(objects)
    while pending and time.monotonic() < deadline:
        found = stored(client, pending)
        pending = [
            o
            for o, r in zip(pending, found, strict=True)
            if not r or r["source"]["generation"] != o.newer
        ]
        time.sleep(0.5)
    assert not pending, (
        f"{len(pending)} objects have no result for their newest generation after {timeout_s:.0f}s"
    )


def set_versioning(client: StackClient, enabled: bool) -> None:
    bucket = client.storage.bucket(client.state.images_bucket)
    bucket.versioning_enabled = enabled
    bucket.patch()
    assert client.storage.get_bucket(client.state.images_bucket).versioning_enabled is enabled


@pytest.fixture(scope="module")
def versioned(client: StackClient) -> Iterator[None]:
    """Object versioning on the images bucket for this module (G1 readable after G2)."""
    set_versioning(client, True)
    yield
    set_versioning(client, False)


@pytest.fixture(scope="module")
def raced(client: StackClient, versioned: None) -> list[Raced]:
    """Fifty objects, each uploaded as G1 and at once as G2; both notifications handled."""
    prefix = f"race-{uuid.uuid4().hex[:8]}"
    cat, coffee = (SAMPLES / "cat.jpg").read_bytes(), (SAMPLES / "coffee.jpg").read_bytes()
    start = threading.Barrier(8)

    def upload_twice(index: int) -> Raced:
        if index < 8:
            start.wait()  # the first uploads of eight workers leave together
        name = f"{prefix}/{index:02d}.jpg"
        uri, older = client.upload(SAMPLES / "cat.jpg", name=name, data=cat)
        _, newer = client.upload(SAMPLES / "coffee.jpg", name=name, data=coffee)
        assert int(newer) > int(older)
        return Raced(str(uri), name, older, newer)

    with ThreadPoolExecutor(8) as pool:
        objects = list(pool.map(upload_twice, range(OBJECTS)))
    wait_for_newest(client, objects, timeout_s=120)
    # The older notifications are pushed alongside the newer ones; any still in flight lands meanwhile.
    time.sleep(SETTLE_S)
    return objects


def test_an_older_generation_is_inferred_and_then_outranked_by_the_store(
    client: StackClient, raced: list[Raced]
) -> None:
    """G1 read after G2's result: Serve computes G1's result and the store keeps G2's."""
    objects = raced[:10]
    requests = [
        {"uri": o.uri, "generation": o.older, "request_id": f"rank-{uuid.uuid4().hex[:8]}", "entry_path": "pubsub"}
        for o in objects
    ]
    response = httpx.post(f"{client.state.serve_url}/v1/infer", json={"requests": requests}, timeout=120)

    assert response.status_code == 200, response.text[:500]
    answers = response.json()["results"]
    for o, answer in zip(objects, answers, strict=True):
        # Inferred on G1's bytes (a cat, not G2's espresso) ...
        assert answer["status"] == "ok" and answer["source"]["generation"] == o.older, answer
        assert answer["labels"][0]["label"] != NEWEST_LABEL, answer
        # ... and ranked below G2's stored result by the conditional writes.
        assert answer.get("superseded") is True, answer
    assert_newest_wins(client, objects)


def test_back_to_back_uploads_leave_the_newest_generation(
    client: StackClient, raced: list[Raced]
) -> None:
    assert len(raced) == OBJECTS
    assert_newest_wins(client, raced)


def test_both_notifications_at_once_leave_the_newest_generation(
    client: StackClient, raced: list[Raced]
) -> None:
    state = client.state

    def race(o: Raced) -> tuple[int, int]:
        gate = threading.Barrier(2)
        statuses: dict[str, int] = {}

        def send(generation: str) -> None:
            with httpx.Client(timeout=120) as http:
                body = notification(state, o.name, generation)
                gate.wait()
                statuses[generation] = deliver(http, state, body)

        threads = [threading.Thread(target=send, args=(g,)) for g in (o.newer, o.older)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return statuses[o.older], statuses[o.newer]

    statuses = in_parallel(race, raced, workers=8)

    assert set(statuses) == {(200, 200)}, statuses
    assert_newest_wins(client, raced)


def test_a_redelivered_older_notification_never_regresses(
    client: StackClient, raced: list[Raced]
) -> None:
    with httpx.Client(timeout=120) as http:
        statuses = in_parallel(
            lambda o: deliver(http, client.state, notification(client.state, o.name, o.older)),
            raced,
        )

    assert set(statuses) == {200}, statuses  # acknowledged: nothing to retry
    assert_newest_wins(client, raced)


def test_an_error_for_the_same_generation_never_replaces_ok(
    client: StackClient, raced: list[Raced]
) -> None:
    """G2's notification again, asking for a version that does not exist: an unknown_version error for G2."""
    bad_version = {VERSION_METADATA_KEY: "99"}
    with httpx.Client(timeout=120) as http:
        statuses = in_parallel(
            lambda o: deliver(
                http, client.state, notification(client.state, o.name, o.newer, bad_version)
            ),
            raced,
        )

    assert set(statuses) == {200}, statuses
    assert_newest_wins(client, raced)


def test_a_replay_after_the_source_was_deleted_never_replaces_ok(
    client: StackClient, raced: list[Raced]
) -> None:
    """G2 replayed once the object is gone: object_missing for G2, which must not replace G2's ok."""
    replayed = raced[:10]
    set_versioning(client, False)  # a delete now removes G2 for good: its read is a 404
    bucket = client.storage.bucket(client.state.images_bucket)
    for o in replayed:
        bucket.delete_blob(o.name)
    with httpx.Client(timeout=120) as http:
        statuses = in_parallel(
            lambda o: deliver(http, client.state, notification(client.state, o.name, o.newer)),
            replayed,
        )

    assert set(statuses) == {200}, statuses
    assert_newest_wins(client, replayed)
