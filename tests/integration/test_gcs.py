"""``GcsClient`` and the conditional result store against a real fake-gcs-server."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from shared.errors import ErrorReason, PermanentError, SupersededError
from shared.gcs import GcsClient, ObjectInfo, PreconditionFailed
from shared.gcs_limits import RequestRefused, object_name_problem
from shared.messages import EntryPath, InferenceRequest
from shared.result_store import GENERATION_METADATA_KEY, StoredResult, store_result
from shared.results import InferenceResult, ModelRef, SourceRef, Status
from shared.uris import GcsUri
from tests.fakes.fake_gcs import FakeGcs

pytestmark = pytest.mark.integration

T = TypeVar("T")
_buckets = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[FakeGcs]:
    fake = FakeGcs()
    fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def bucket(server: FakeGcs) -> str:
    """A fresh, empty bucket."""
    return server.client().create_bucket(f"gcs-client-{next(_buckets)}").name


def _with_client(server: FakeGcs, work: Callable[[GcsClient], Awaitable[T]]) -> T:
    """Run ``work`` with a client on its own event loop, and close the client after."""

    async def run() -> T:
        gcs = GcsClient(server.url, None, timeout_s=10)
        try:
            return await work(gcs)
        finally:
            await gcs.close()

    return asyncio.run(run())


def _upload(server: FakeGcs, bucket: str, name: str, data: bytes) -> int:
    """Upload with the google-cloud-storage client (independent of the code under test)."""
    blob = server.client().bucket(bucket).blob(name)
    blob.upload_from_string(data, content_type="image/jpeg")
    assert blob.generation is not None
    return int(blob.generation)


# --- reads ------------------------------------------------------------------------------


def test_read_returns_the_bytes_and_their_generation(server: FakeGcs, bucket: str) -> None:
    name = "dir/ü cat #1?.jpg"  # every character that needs quoting in a URL path
    generation = _upload(server, bucket, name, b"\xff\xd8 pixels")
    uri = GcsUri(bucket, name)

    latest = _with_client(server, lambda gcs: gcs.read(uri, None, 1000))
    pinned = _with_client(server, lambda gcs: gcs.read(uri, str(generation), 1000))

    assert latest == (b"\xff\xd8 pixels", str(generation))
    assert pinned == latest


def test_reading_a_missing_object_is_object_missing(server: FakeGcs, bucket: str) -> None:
    uri = GcsUri(bucket, "nobody-uploaded-this.jpg")

    with pytest.raises(PermanentError) as info:
        _with_client(server, lambda gcs: gcs.read(uri, None, 1000))

    assert info.value.reason is ErrorReason.OBJECT_MISSING
    assert str(uri) in info.value.message


def test_reading_a_replaced_generation_is_superseded(server: FakeGcs, bucket: str) -> None:
    old = _upload(server, bucket, "cat.jpg", b"old")
    new = _upload(server, bucket, "cat.jpg", b"new")
    uri = GcsUri(bucket, "cat.jpg")

    with pytest.raises(SupersededError) as info:
        _with_client(server, lambda gcs: gcs.read(uri, str(old), 1000))

    assert str(new) in str(info.value)
    assert _with_client(server, lambda gcs: gcs.read(uri, str(new), 1000)) == (b"new", str(new))


def test_reading_a_generation_that_never_existed_is_object_missing(
    server: FakeGcs, bucket: str
) -> None:
    current = _upload(server, bucket, "cat.jpg", b"data")
    uri = GcsUri(bucket, "cat.jpg")

    with pytest.raises(PermanentError) as info:
        _with_client(server, lambda gcs: gcs.read(uri, str(current + 1000), 1000))

    assert info.value.reason is ErrorReason.OBJECT_MISSING


def test_an_object_over_the_limit_is_image_too_large(server: FakeGcs, bucket: str) -> None:
    _upload(server, bucket, "big.jpg", b"x" * 5000)
    uri = GcsUri(bucket, "big.jpg")

    with pytest.raises(PermanentError) as info:
        _with_client(server, lambda gcs: gcs.read(uri, None, 4999))

    assert info.value.reason is ErrorReason.IMAGE_TOO_LARGE
    assert "4999" in info.value.message
    assert _with_client(server, lambda gcs: gcs.read(uri, None, 5000))[0] == b"x" * 5000


# --- writes and metadata ----------------------------------------------------------------


def test_create_only_writes_refuse_an_existing_object(server: FakeGcs, bucket: str) -> None:
    async def work(gcs: GcsClient) -> ObjectInfo:
        first = await gcs.write(bucket, "r.json", b'{"n": 1}', if_generation_match=0)
        with pytest.raises(PreconditionFailed):
            await gcs.write(bucket, "r.json", b'{"n": 2}', if_generation_match=0)
        return first

    first = _with_client(server, work)

    assert first.generation > 0 and first.size == 8
    blob = server.client().bucket(bucket).get_blob("r.json")
    assert blob is not None and blob.download_as_bytes() == b'{"n": 1}'
    assert int(blob.generation) == first.generation
    assert blob.content_type == "application/json"


def test_a_write_conditioned_on_a_stale_generation_fails(server: FakeGcs, bucket: str) -> None:
    async def work(gcs: GcsClient) -> tuple[ObjectInfo, ObjectInfo]:
        first = await gcs.write(bucket, "r.json", b"1", if_generation_match=0)
        second = await gcs.write(bucket, "r.json", b"2", if_generation_match=first.generation)
        with pytest.raises(PreconditionFailed):
            await gcs.write(bucket, "r.json", b"3", if_generation_match=first.generation)
        return first, second

    first, second = _with_client(server, work)

    assert second.generation > first.generation
    assert server.client().bucket(bucket).blob("r.json").download_as_bytes() == b"2"


def test_metadata_round_trips_through_info(server: FakeGcs, bucket: str) -> None:
    metadata = {"triggerfish-source-generation": "17", "triggerfish-status": "ok"}

    async def work(gcs: GcsClient) -> tuple[ObjectInfo, ObjectInfo | None, ObjectInfo | None]:
        written = await gcs.write(bucket, "a/b.json", b"{}", metadata=metadata)
        return written, await gcs.info(bucket, "a/b.json"), await gcs.info(bucket, "a/none.json")

    written, info, missing = _with_client(server, work)

    assert info == ObjectInfo(written.generation, 2, metadata)
    assert written.metadata == metadata
    assert missing is None


def test_delete_removes_the_object_and_says_whether_there_was_one(server: FakeGcs, bucket: str) -> None:
    async def work(gcs: GcsClient) -> tuple[bool, ObjectInfo | None, bool]:
        await gcs.write(bucket, "gone.json", b"{}")
        deleted = await gcs.delete(bucket, "gone.json")
        return deleted, await gcs.info(bucket, "gone.json"), await gcs.delete(bucket, "gone.json")

    deleted, after, again = _with_client(server, work)

    assert (deleted, after, again) == (True, None, False)


def test_from_environment_uses_the_emulator_without_credentials(
    server: FakeGcs, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url.removeprefix("http://"))
    generation = _upload(server, bucket, "cat.jpg", b"data")

    async def work() -> tuple[bytes, str]:
        gcs = GcsClient.from_environment()
        try:
            return await gcs.read(GcsUri(bucket, "cat.jpg"), None, 100)
        finally:
            await gcs.close()

    assert asyncio.run(work()) == (b"data", str(generation))


# --- the result store -------------------------------------------------------------------


def _result(generation: int) -> InferenceResult:
    return InferenceResult(
        source=SourceRef(uri="gs://triggerfish-images/cat.jpg", generation=str(generation)),
        model=ModelRef(name="mobilenet_v2", version="1"),
        status=Status.OK,
        labels=[],
        request_id=f"gen-{generation}",
        entry_path=EntryPath.UPLOAD,
    )


def test_concurrent_stores_in_any_order_keep_the_newest_generation(
    server: FakeGcs, bucket: str
) -> None:
    # Several objects at once, so that a store that loses this race cannot pass by luck.
    sources = [GcsUri("triggerfish-images", f"cat-{i}.jpg") for i in range(8)]
    shuffled = random.Random(2024)
    work_items = [(source, g) for source in sources for g in range(1, 51)]
    shuffled.shuffle(work_items)

    async def work(gcs: GcsClient) -> list[StoredResult]:
        return await asyncio.gather(
            *(store_result(gcs, bucket, _result(g), s) for s, g in work_items)
        )

    stored = _with_client(server, work)

    assert len({s.uri for s in stored}) == len(sources)
    for source in sources:
        name = f"mobilenet_v2/triggerfish-images/{source.name}.json"
        blob = server.client().bucket(bucket).get_blob(name)
        assert blob is not None
        body: dict[str, Any] = json.loads(blob.download_as_bytes())
        assert (body["request_id"], body["source"]["generation"]) == ("gen-50", "50"), name
        assert blob.metadata[GENERATION_METADATA_KEY] == "50"


def test_a_stored_result_is_kept_against_an_older_one(server: FakeGcs, bucket: str) -> None:
    source = GcsUri("triggerfish-images", "dog.jpg")

    async def work(gcs: GcsClient) -> list[StoredResult]:
        return [
            await store_result(gcs, bucket, _result(7), source),
            await store_result(gcs, bucket, _result(3), source),
            await store_result(gcs, bucket, _result(7), source),
        ]

    newer, older, again = _with_client(server, work)

    assert (newer.written, older.written, older.superseded) == (True, False, True)
    assert (again.written, again.superseded) == (True, False)  # equal rank: replaced


# --- Cloud Storage's limits, which fake-gcs-server does not enforce ------------------------


def _long_source(name_bytes: int = 1000) -> GcsUri:
    """A valid source name of ``name_bytes`` bytes; its plain result name is over 1024 bytes."""
    return GcsUri("triggerfish-images", "deep/" + "n" * (name_bytes - len("deep/")))


def test_fake_gcs_server_accepts_a_name_the_cloud_refuses_but_the_client_does_not(
    server: FakeGcs, bucket: str
) -> None:
    too_long = "x" * 1025
    # The emulator alone: written without complaint (the cloud answers 400).
    server.client().bucket(bucket).blob(too_long).upload_from_string(b"{}")
    assert server.client().bucket(bucket).get_blob(too_long) is not None

    async def work(gcs: GcsClient) -> ObjectInfo:
        return await gcs.write(bucket, "y" * 1025, b"{}", if_generation_match=0)

    with pytest.raises(RequestRefused) as info:
        _with_client(server, work)

    assert info.value.status == 400 and info.value.reason is ErrorReason.INVALID_URI
    assert server.client().bucket(bucket).get_blob("y" * 1025) is None


def test_a_1000_byte_source_name_gets_a_name_cloud_storage_accepts_or_a_permanent_refusal(
    server: FakeGcs, bucket: str
) -> None:
    source = _long_source()
    result = _result(5).model_copy(update={"source": SourceRef(uri=str(source), generation="5")})

    async def work(gcs: GcsClient) -> StoredResult:
        return await store_result(gcs, bucket, result, source)

    try:
        stored = _with_client(server, work)
    except RequestRefused:
        return  # permanent: recorded by request id instead (see the function-side test below)
    name = stored.uri.removeprefix(f"gs://{bucket}/")
    assert object_name_problem(name) is None, len(name.encode())
    blob = server.client().bucket(bucket).get_blob(name)
    assert blob is not None and json.loads(blob.download_as_bytes())["source"]["uri"] == str(source)


def test_the_function_records_a_1000_byte_source_name_where_cloud_storage_accepts_it(
    server: FakeGcs, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functions._forward as forward_module

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url.removeprefix("http://"))
    monkeypatch.setenv("TRIGGERFISH_RESULTS_BUCKET", bucket)
    forward_module.get_settings.cache_clear()
    source = _long_source()
    request = InferenceRequest(uri=str(source), request_id="long-name-1", entry_path=EntryPath.PUBSUB)
    try:
        uri = forward_module.record_failure(request, PermanentError(ErrorReason.OBJECT_MISSING, "gone"), source)
    finally:
        forward_module.get_settings.cache_clear()

    assert uri is not None
    name = uri.removeprefix(f"gs://{bucket}/")
    assert object_name_problem(name) is None
    record = json.loads(server.client().bucket(bucket).blob(name).download_as_bytes())
    assert record["request_id"] == "long-name-1" and record["error"]["reason"] == "object_missing"
    assert record["source"]["uri"] == str(source)
