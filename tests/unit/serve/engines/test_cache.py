"""The engine cache: levels, integrity, compatibility, atomic publishing (real fake-gcs-server)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc

from serve.engines.cache import (
    DiskEngineStore,
    EngineBuildError,
    EngineCache,
    EngineCacheKey,
    GcsEngineStore,
    IncompatibleEngineError,
)
from shared.errors import ConfigError

KEY = EngineCacheKey(
    onnx_sha256=hashlib.sha256(b"model").hexdigest(),
    backend="tensorrt",
    backend_version="10.3.0",
    device_name="NVIDIA H100 80GB HBM3",
    compute_capability="sm_90",
    cuda_version="12.4",
    precision="fp16",
    batch_sizes=(1, 4, 8),
    input_name="input",
    input_shape=(3, 224, 224),
    input_dtype="float32",
)
OTHER_GPU = dataclasses.replace(KEY, device_name="NVIDIA L4", compute_capability="sm_89")


class Builds:
    """A build function that counts calls and returns distinct bytes per build."""

    def __init__(self, payload: bytes = b"plan") -> None:
        self.payload = payload
        self.calls = 0

    def __call__(self) -> bytes:
        self.calls += 1
        return self.payload + b"#" + str(self.calls).encode()


class Loaded:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _get(cache: EngineCache, build: Builds, key: EngineCacheKey = KEY, **kwargs):  # noqa: ANN202
    return cache.get_or_build(key, build=build, load=Loaded, **kwargs)


def _disk(tmp_path: Path, name: str = "disk") -> EngineCache:
    return EngineCache(disk=DiskEngineStore(tmp_path / name))


def _gcs(tmp_path: Path, bucket, name: str) -> EngineCache:  # noqa: ANN001
    shared = GcsEngineStore(f"gs://{bucket.name}/engines", client=bucket.client)
    return EngineCache(disk=DiskEngineStore(tmp_path / name), shared=shared)


def _objects(bucket) -> list[str]:  # noqa: ANN001
    return sorted(b.name for b in bucket.client.list_blobs(bucket.name))


# --- the key ----------------------------------------------------------------------------------


def test_key_digest_is_stable_and_covers_every_field() -> None:
    again = EngineCacheKey.from_dict(json.loads(json.dumps(KEY.to_dict())))
    assert again == KEY and again.digest() == KEY.digest()
    # Golden value: if this changes, existing cache entries stop matching; that must be a
    # deliberate change that also bumps CACHE_FORMAT_VERSION.
    assert KEY.digest() == "0a3c33bec5b9f1ad5014115b32aa09df3f6cf3502c94027e4844f066648c8c33"
    changes = {
        "onnx_sha256": "0" * 64,
        "backend": "onnxruntime",
        "backend_version": "10.4.0",
        "device_name": "NVIDIA A100",
        "compute_capability": "sm_80",
        "cuda_version": "12.6",
        "precision": "int8",
        "batch_sizes": (1, 8),
        "input_name": "images",
        "input_shape": (3, 256, 256),
        "input_dtype": "uint8",
        "options": (("calibration", "x"),),
        "format_version": 2,
    }
    assert set(changes) == {f.name for f in dataclasses.fields(EngineCacheKey)}
    digests = {dataclasses.replace(KEY, **{k: v}).digest() for k, v in changes.items()}
    assert len(digests) == len(changes) and KEY.digest() not in digests


def test_key_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="onnx_sha256"):
        dataclasses.replace(KEY, onnx_sha256="abc")
    with pytest.raises(ValueError, match="batch_sizes"):
        dataclasses.replace(KEY, batch_sizes=(8, 4))
    with pytest.raises(ValueError, match="differ"):
        EngineCacheKey.from_dict({**KEY.to_dict(), "extra": 1})


# --- memory and disk --------------------------------------------------------------------------


def test_memory_hit_then_lru_eviction(tmp_path) -> None:
    cache = EngineCache(memory_entries=2)
    build = Builds()
    assert _get(cache, build).report.level == "built"
    hit = _get(cache, build)
    assert hit.report.level == "memory" and hit.value.data == b"plan#1" and build.calls == 1
    for seed in ("a", "b"):
        _get(
            cache,
            build,
            dataclasses.replace(KEY, onnx_sha256=hashlib.sha256(seed.encode()).hexdigest()),
        )
    assert len(cache.memory) == 2
    assert _get(cache, build).report.level == "built"  # KEY was evicted
    assert build.calls == 4


def test_disk_hit_from_another_process_and_timings(tmp_path) -> None:
    build = Builds()
    first = _get(_disk(tmp_path), build)
    assert first.report.level == "built"
    assert first.report.build_seconds > 0 and first.report.lookup_seconds >= 0
    second = _get(_disk(tmp_path), build)  # a fresh cache = a new replica on the same node
    assert second.report.level == "disk"
    assert second.value.data == b"plan#1" and build.calls == 1
    assert second.report.build_seconds == 0 and second.report.load_seconds >= 0
    assert second.report.key_digest == KEY.digest()
    assert second.report.engine_bytes == len(b"plan#1")
    folder = tmp_path / "disk" / KEY.digest()
    meta = json.loads((folder / "metadata.json").read_text())
    assert (
        meta["key"] == KEY.to_dict()
        and meta["engine_sha256"] == hashlib.sha256(b"plan#1").hexdigest()
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["metadata.json", meta["engine_object"]]
    )


def test_corrupted_disk_entry_is_discarded_and_rebuilt(tmp_path, caplog) -> None:
    build = Builds()
    _get(_disk(tmp_path), build)
    engine_file = next((tmp_path / "disk").rglob("*.engine"))
    engine_file.write_bytes(b"plan#X")  # same size, other bytes
    with caplog.at_level(logging.WARNING):
        result = _get(_disk(tmp_path), build)
    assert result.report.level == "built" and result.value.data == b"plan#2"
    assert "sha256" in caplog.text and "discarding disk entry" in caplog.text


def test_entry_whose_metadata_names_another_gpu_is_never_used(tmp_path, caplog) -> None:
    store = DiskEngineStore(tmp_path / "disk")
    store.store(OTHER_GPU, b"l4-plan", {})
    # Plant the L4 entry where the H100 key looks (a digest collision, or tampering).
    (tmp_path / "disk" / OTHER_GPU.digest()).rename(tmp_path / "disk" / KEY.digest())
    build = Builds()
    with caplog.at_level(logging.WARNING):
        result = _get(EngineCache(disk=store), build)
    assert result.value.data == b"plan#1" and result.report.level == "built"
    assert "metadata key does not match" in caplog.text


def test_engine_without_metadata_is_absent(tmp_path) -> None:
    folder = tmp_path / "disk" / KEY.digest()
    folder.mkdir(parents=True)
    (folder / f"{hashlib.sha256(b'half').hexdigest()}.engine").write_bytes(b"half")
    assert _get(_disk(tmp_path), Builds()).report.level == "built"


def test_interrupted_disk_write_leaves_no_entry_and_does_not_fail_the_load(
    tmp_path, monkeypatch, caplog
) -> None:
    def crash(src, dst):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with caplog.at_level(logging.WARNING):
        result = _get(_disk(tmp_path), Builds())
    assert result.value.data == b"plan#1"
    assert "could not write" in caplog.text and "disk full" in caplog.text
    monkeypatch.undo()
    leftovers = [p for p in (tmp_path / "disk").rglob("*") if p.is_file()]
    assert leftovers == []
    assert _get(_disk(tmp_path), Builds()).report.level == "built"


def test_backend_refusing_cached_bytes_discards_and_rebuilds(tmp_path) -> None:
    build = Builds()
    _get(_disk(tmp_path), build)

    def picky(data: bytes) -> Loaded:
        if data == b"plan#1":
            raise IncompatibleEngineError("built by another TensorRT")
        return Loaded(data)

    result = _disk(tmp_path).get_or_build(KEY, build=build, load=picky)
    assert result.report.level == "built" and result.value.data == b"plan#2"
    assert result.report.discarded == (
        "disk: backend refused the engine (built by another TensorRT)",
    )
    assert _get(_disk(tmp_path), build).value.data == b"plan#2"  # the rebuilt entry replaced it


def test_validation_failure_publishes_nothing(tmp_path) -> None:
    loaded: list[Loaded] = []

    def load(data: bytes) -> Loaded:
        loaded.append(Loaded(data))
        return loaded[-1]

    def refuse(engine: Loaded) -> None:
        raise RuntimeError("accuracy too low")

    cache = _disk(tmp_path)
    with pytest.raises(RuntimeError, match="accuracy"):
        cache.get_or_build(KEY, build=Builds(), load=load, validate=refuse)
    assert loaded[0].closed
    assert len(cache.memory) == 0 and not (tmp_path / "disk").exists()


def test_validation_verdict_is_stored_with_the_entry(tmp_path) -> None:
    _get(_disk(tmp_path), Builds(), validate=lambda engine: {"agreement": 0.99, "passed": True})
    hit = _get(_disk(tmp_path), Builds())
    assert hit.report.info["validation"] == {"agreement": 0.99, "passed": True}


def _niceness() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_the_build_runs_at_a_lower_priority_and_the_engine_opens_at_the_callers(tmp_path) -> None:
    """An engine's worker threads start when it is opened: they must not inherit a build's priority."""
    seen: dict[str, int] = {}
    caller = _niceness()

    def build() -> bytes:
        seen["build"] = _niceness()
        return b"plan"

    def load(data: bytes) -> Loaded:
        seen["load"] = _niceness()
        return Loaded(data)

    _disk(tmp_path).get_or_build(KEY, build=build, load=load)

    assert seen == {"build": min(19, caller + 10), "load": caller}
    assert _niceness() == caller


def test_a_build_failure_reaches_the_caller_as_it_is(tmp_path) -> None:
    def build() -> bytes:
        raise MemoryError("out of device memory while building")

    with pytest.raises(MemoryError, match="while building"):
        _disk(tmp_path).get_or_build(KEY, build=build, load=Loaded)


def test_empty_build_is_an_error(tmp_path) -> None:
    with pytest.raises(EngineBuildError, match="no bytes"):
        _disk(tmp_path).get_or_build(KEY, build=lambda: b"", load=Loaded)


def test_from_settings_picks_levels(tmp_path) -> None:
    cache = EngineCache.from_settings(
        str(tmp_path / "d"), "gs://bucket/engines", gcs_client=object()
    )
    assert isinstance(cache.shared, GcsEngineStore)
    assert (cache.shared.bucket_name, cache.shared.prefix) == ("bucket", "engines")
    shared_dir = EngineCache.from_settings(str(tmp_path / "d"), str(tmp_path / "nfs"))
    assert isinstance(shared_dir.shared, DiskEngineStore) and shared_dir.shared.level == "shared"
    assert EngineCache.from_settings(str(tmp_path / "d")).shared is None
    with pytest.raises(ConfigError, match="'s3://x'"):
        EngineCache.from_settings(str(tmp_path / "d"), "s3://x")
    with pytest.raises(ConfigError, match="no bucket"):
        GcsEngineStore("gs:///x")


# --- the shared gs:// level --------------------------------------------------------------------


def test_gcs_publish_then_hit_from_another_node(tmp_path, gcs_bucket) -> None:
    build = Builds()
    assert _get(_gcs(tmp_path, gcs_bucket, "node-a"), build).report.level == "built"
    digest = KEY.digest()
    assert _objects(gcs_bucket) == sorted(
        [
            f"engines/{digest}/metadata.json",
            f"engines/{digest}/{hashlib.sha256(b'plan#1').hexdigest()}.engine",
        ]
    )
    other_node = _gcs(tmp_path, gcs_bucket, "node-b")
    hit = _get(other_node, build)
    assert hit.report.level == "gcs" and hit.value.data == b"plan#1" and build.calls == 1
    assert _get(_gcs(tmp_path, gcs_bucket, "node-b"), build).report.level == "disk"  # promoted


def test_gcs_corrupted_engine_is_rebuilt_and_republished(tmp_path, gcs_bucket, caplog) -> None:
    build = Builds()
    _get(_gcs(tmp_path, gcs_bucket, "a"), build)
    engine_name = next(n for n in _objects(gcs_bucket) if n.endswith(".engine"))
    gcs_bucket.blob(engine_name).upload_from_string(b"garbage")
    with caplog.at_level(logging.WARNING):
        result = _get(_gcs(tmp_path, gcs_bucket, "b"), build)
    assert result.report.level == "built" and result.value.data == b"plan#2"
    assert "discarding gs://" in caplog.text
    again = _get(_gcs(tmp_path, gcs_bucket, "c"), build)
    assert again.report.level == "gcs" and again.value.data == b"plan#2"
    assert len([n for n in _objects(gcs_bucket) if n.endswith(".engine")]) == 1


def test_gcs_metadata_for_another_gpu_is_never_reused(tmp_path, gcs_bucket) -> None:
    store = GcsEngineStore(f"gs://{gcs_bucket.name}/engines", client=gcs_bucket.client)
    store.store(OTHER_GPU, b"l4-plan", {})
    meta = gcs_bucket.blob(store.object_name(OTHER_GPU, "metadata.json")).download_as_bytes()
    engine = f"{hashlib.sha256(b'l4-plan').hexdigest()}.engine"
    gcs_bucket.blob(store.object_name(KEY, "metadata.json")).upload_from_string(meta)
    gcs_bucket.blob(store.object_name(KEY, engine)).upload_from_string(b"l4-plan")
    result = _get(_gcs(tmp_path, gcs_bucket, "h100"), Builds())
    assert result.report.level == "built" and result.value.data == b"plan#1"
    assert result.value.data != b"l4-plan"


def test_gcs_engine_without_metadata_is_absent(tmp_path, gcs_bucket) -> None:
    store = GcsEngineStore(f"gs://{gcs_bucket.name}/engines", client=gcs_bucket.client)
    half = f"{hashlib.sha256(b'plan#1').hexdigest()}.engine"
    gcs_bucket.blob(store.object_name(KEY, half)).upload_from_string(b"plan#1")
    result = _get(_gcs(tmp_path, gcs_bucket, "a"), Builds())
    assert result.report.level == "built"
    assert store.fetch(KEY) is not None  # published properly now (engine reused, metadata added)


def test_metadata_create_is_guarded_by_a_precondition(gcs_bucket) -> None:
    store = GcsEngineStore(f"gs://{gcs_bucket.name}/engines", client=gcs_bucket.client)
    first = store.store(KEY, b"first", {})
    second = store.store(KEY, b"second", {})
    assert second.data == b"first" and second.sha256 == first.sha256
    assert len([n for n in _objects(gcs_bucket) if n.endswith(".engine")]) == 1  # loser cleaned up
    with pytest.raises(gexc.PreconditionFailed):
        gcs_bucket.blob(store.object_name(KEY, "metadata.json")).upload_from_string(
            b"{}", if_generation_match=0
        )


def test_concurrent_builders_leave_exactly_one_entry(tmp_path, gcs_bucket) -> None:
    both_built = threading.Barrier(2)
    results: dict[str, object] = {}

    def replica(name: str) -> None:
        def build() -> bytes:
            both_built.wait(timeout=10)  # both have built before either publishes
            return f"plan-from-{name}".encode()

        results[name] = _gcs(tmp_path, gcs_bucket, name).get_or_build(KEY, build=build, load=Loaded)

    threads = [threading.Thread(target=replica, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    names = _objects(gcs_bucket)
    assert len(names) == 2 and sum(n.endswith("metadata.json") for n in names) == 1
    winner = GcsEngineStore(f"gs://{gcs_bucket.name}/engines", client=gcs_bucket.client).fetch(KEY)
    assert winner is not None
    assert {r.value.data for r in results.values()} == {winner.data}  # type: ignore[attr-defined]
    for name in ("a", "b"):  # each node's disk holds the winner too
        assert _get(_disk(tmp_path, name), Builds()).value.data == winner.data


def test_gcs_outage_degrades_to_building(tmp_path, caplog) -> None:
    class DownClient:
        def bucket(self, name: str) -> None:
            raise gexc.ServiceUnavailable("storage is down")

    cache = EngineCache(
        disk=DiskEngineStore(tmp_path / "d"), shared=GcsEngineStore("gs://b/p", client=DownClient())
    )
    with caplog.at_level(logging.WARNING):
        result = _get(cache, Builds())
    assert result.report.level == "built"
    assert "treating as a miss" in caplog.text and "could not publish" in caplog.text
