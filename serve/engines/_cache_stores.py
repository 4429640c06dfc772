"""Levels of the engine cache: the in-process LRU, a directory and a ``gs://`` prefix.

Both use the same layout under ``<root>/<key digest>/``:

* ``<engine sha256>.engine`` — the serialized engine, named by its content;
* ``metadata.json`` — the key, the engine's sha256 and size, and build info.

The engine is written first and the metadata last, and readers start from the
metadata, so an engine without metadata (a writer that died half-way) is simply
absent. Each fetch re-checks the metadata against the key and the bytes against
the recorded sha256; a mismatch discards the entry (logged) and reports a miss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from shared.errors import ConfigError

if TYPE_CHECKING:
    from serve.engines._cache_key import EngineCacheKey

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.json"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """Verified engine bytes and the build info recorded with them."""

    key: EngineCacheKey
    data: bytes
    sha256: str
    info: Mapping[str, object] = field(default_factory=dict)


class EngineStore(Protocol):
    """A persistent cache level."""

    level: str

    def fetch(self, key: EngineCacheKey) -> CachedEntry | None:
        """The verified entry for ``key``, or None (a bad entry is discarded first)."""
        ...

    def store(self, key: EngineCacheKey, data: bytes, info: Mapping[str, object]) -> CachedEntry:
        """Save ``data``; returns the entry the level holds afterwards (another writer's if it won)."""
        ...

    def discard(self, key: EngineCacheKey, reason: str) -> None:
        """Remove the entry for ``key``, logging ``reason``."""
        ...


class MemoryLevel:
    """Per-replica LRU of verified engine bytes, bounded by entry count."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._entries: OrderedDict[str, CachedEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> CachedEntry | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
            return entry

    def put(self, digest: str, entry: CachedEntry) -> None:
        if self._max == 0:
            return
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > self._max:
                evicted, _ = self._entries.popitem(last=False)
                logger.debug("engine cache: evicted %s from memory", evicted)

    def discard(self, digest: str) -> None:
        with self._lock:
            self._entries.pop(digest, None)

    def __len__(self) -> int:
        return len(self._entries)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def engine_object_name(sha256: str) -> str:
    return f"{sha256}.engine"


def make_metadata(key: EngineCacheKey, data: bytes, info: Mapping[str, object]) -> dict:
    sha = hashlib.sha256(data).hexdigest()
    return {
        "key_digest": key.digest(),
        "key": key.to_dict(),
        "engine_object": engine_object_name(sha),
        "engine_sha256": sha,
        "engine_size": len(data),
        "info": dict(info),
    }


def encode_metadata(meta: Mapping[str, object]) -> bytes:
    return json.dumps(meta, sort_keys=True, indent=1, default=str).encode()


def check_metadata(raw: bytes, key: EngineCacheKey) -> tuple[dict | None, str | None]:
    """Parse metadata and compare it with ``key``; returns ``(meta, None)`` or ``(meta?, reason)``."""
    try:
        meta = json.loads(raw)
    except ValueError as err:
        return None, f"unreadable metadata ({err})"
    if not isinstance(meta, dict):
        return None, "metadata is not an object"
    if meta.get("key") != key.to_dict() or meta.get("key_digest") != key.digest():
        return meta, f"metadata key does not match (stored {meta.get('key')!r})"
    sha = meta.get("engine_sha256")
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        return meta, f"metadata has no valid engine_sha256 ({sha!r})"
    if meta.get("engine_object") != engine_object_name(sha):
        return meta, f"metadata names unexpected engine object {meta.get('engine_object')!r}"
    return meta, None


def check_bytes(meta: Mapping[str, object], data: bytes) -> str | None:
    if len(data) != meta.get("engine_size"):
        return f"engine is {len(data)} bytes, metadata says {meta.get('engine_size')}"
    actual = hashlib.sha256(data).hexdigest()
    if actual != meta.get("engine_sha256"):
        return f"engine sha256 {actual[:12]} does not match metadata {str(meta.get('engine_sha256'))[:12]}"
    return None


class DiskEngineStore:
    """A local (or shared-mount) directory level."""

    def __init__(self, root: Path, level: str = "disk") -> None:
        self.root = Path(root)
        self.level = level

    def _dir(self, key: EngineCacheKey) -> Path:
        return self.root / key.digest()

    def fetch(self, key: EngineCacheKey) -> CachedEntry | None:
        meta_path = self._dir(key) / METADATA_NAME
        try:
            raw = meta_path.read_bytes()
        except FileNotFoundError:
            return None
        meta, reason = check_metadata(raw, key)
        if reason is None and meta is not None:
            try:
                data = (self._dir(key) / str(meta["engine_object"])).read_bytes()
            except FileNotFoundError:
                reason = "engine file missing"
            else:
                reason = check_bytes(meta, data)
                if reason is None:
                    return CachedEntry(key, data, str(meta["engine_sha256"]), meta.get("info", {}))
        self.discard(key, reason or "invalid entry")
        return None

    def store(self, key: EngineCacheKey, data: bytes, info: Mapping[str, object]) -> CachedEntry:
        meta = make_metadata(key, data, info)
        folder = self._dir(key)
        engine_path = folder / str(meta["engine_object"])
        if not (engine_path.exists() and engine_path.stat().st_size == len(data)):
            write_atomic(engine_path, data)
        write_atomic(folder / METADATA_NAME, encode_metadata(meta))
        for stale in folder.glob("*.engine"):
            if stale != engine_path:
                stale.unlink(missing_ok=True)
        return CachedEntry(key, data, str(meta["engine_sha256"]), meta["info"])

    def discard(self, key: EngineCacheKey, reason: str) -> None:
        folder = self._dir(key)
        logger.warning("engine cache: discarding %s entry %s: %s", self.level, folder, reason)
        (folder / METADATA_NAME).unlink(
            missing_ok=True
        )  # metadata first: the entry is gone at once
        for engine in folder.glob("*.engine"):
            engine.unlink(missing_ok=True)


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not uri.startswith("gs://"):
        raise ConfigError(f"engine cache URI must start with gs://, got {uri!r}")
    bucket, _, prefix = uri[len("gs://") :].partition("/")
    if not bucket:
        raise ConfigError(f"engine cache URI names no bucket: {uri!r}")
    return bucket, prefix.strip("/")


class GcsEngineStore:
    """The shared level: a ``gs://bucket/prefix`` every replica reads and publishes to.

    Publishing is first-writer-wins: the metadata object is created with
    ``if_generation_match=0``, so of two replicas that built the same key at the
    same time exactly one entry survives; the loser deletes its own engine object
    and uses the winner's. Cloud Storage being down degrades to a miss (and an
    unpublished build), never to a failed load.
    """

    level = "gcs"

    def __init__(self, uri: str, client: object | None = None) -> None:
        self.bucket_name, self.prefix = parse_gs_uri(uri)
        self._client = client
        self._bucket_obj: object | None = None

    @property
    def _bucket(self):  # noqa: ANN202 - google.cloud.storage.Bucket, imported lazily
        if self._bucket_obj is None:
            if self._client is None:
                from shared.storage import get_storage_client

                self._client = get_storage_client()
            self._bucket_obj = self._client.bucket(self.bucket_name)  # type: ignore[attr-defined]
        return self._bucket_obj

    def object_name(self, key: EngineCacheKey, leaf: str) -> str:
        parts = [p for p in (self.prefix, key.digest(), leaf) if p]
        return "/".join(parts)

    def fetch(self, key: EngineCacheKey) -> CachedEntry | None:
        from google.api_core import exceptions as gexc

        try:
            return self._fetch(key)
        except (gexc.GoogleAPICallError, gexc.RetryError, OSError) as err:
            logger.warning(
                "engine cache: gs://%s unavailable, treating as a miss: %s", self.bucket_name, err
            )
            return None

    def _fetch(self, key: EngineCacheKey) -> CachedEntry | None:
        from google.api_core import exceptions as gexc

        meta_blob = self._bucket.get_blob(self.object_name(key, METADATA_NAME))  # type: ignore[attr-defined]
        if meta_blob is None:
            return None
        try:
            raw = meta_blob.download_as_bytes(if_generation_match=meta_blob.generation)
        except (gexc.NotFound, gexc.PreconditionFailed):
            return None  # replaced or removed while we read it: a miss, not an error
        meta, reason = check_metadata(raw, key)
        if reason is None and meta is not None:
            name = self.object_name(key, str(meta["engine_object"]))
            try:
                data = self._bucket.blob(name).download_as_bytes()  # type: ignore[attr-defined]
            except gexc.NotFound:
                reason = "engine object missing"
            else:
                reason = check_bytes(meta, data)
                if reason is None:
                    return CachedEntry(key, data, str(meta["engine_sha256"]), meta.get("info", {}))
        self._discard(key, reason or "invalid entry", meta_blob.generation, meta)
        return None

    def store(self, key: EngineCacheKey, data: bytes, info: Mapping[str, object]) -> CachedEntry:
        from google.api_core import exceptions as gexc

        meta = make_metadata(key, data, info)
        ours = CachedEntry(key, data, str(meta["engine_sha256"]), meta["info"])
        try:
            return self._publish(key, data, meta, ours)
        except (gexc.GoogleAPICallError, gexc.RetryError, OSError) as err:
            logger.warning(
                "engine cache: could not publish %s to gs://%s: %s",
                key.digest()[:12],
                self.bucket_name,
                err,
            )
            return ours

    def _publish(
        self, key: EngineCacheKey, data: bytes, meta: dict, ours: CachedEntry
    ) -> CachedEntry:
        from google.api_core import exceptions as gexc

        engine_blob = self._bucket.blob(self.object_name(key, str(meta["engine_object"])))  # type: ignore[attr-defined]
        meta_blob = self._bucket.blob(self.object_name(key, METADATA_NAME))  # type: ignore[attr-defined]
        created = False
        for _ in range(2):  # a second try only after discarding an invalid existing entry
            created = _ensure_object(engine_blob, data, ours.sha256) or created
            try:
                meta_blob.upload_from_string(
                    encode_metadata(meta), content_type="application/json", if_generation_match=0
                )
            except gexc.PreconditionFailed:
                winner = self._fetch(key)
                if winner is None:
                    continue  # the existing entry was invalid and is now discarded
                if created and winner.sha256 != ours.sha256:
                    _delete(engine_blob)
                logger.info(
                    "engine cache: %s already published by another builder", key.digest()[:12]
                )
                return winner
            logger.info(
                "engine cache: published %s to gs://%s", key.digest()[:12], self.bucket_name
            )
            return ours
        if created:
            _delete(engine_blob)  # never published: leave no orphan behind
        logger.warning("engine cache: gave up publishing %s (contended)", key.digest()[:12])
        return ours

    def discard(self, key: EngineCacheKey, reason: str) -> None:
        from google.api_core import exceptions as gexc

        try:
            blob = self._bucket.get_blob(self.object_name(key, METADATA_NAME))  # type: ignore[attr-defined]
            meta = json.loads(blob.download_as_bytes()) if blob is not None else None
            self._discard(key, reason, blob.generation if blob is not None else None, meta)
        except (gexc.GoogleAPICallError, gexc.RetryError, OSError, ValueError) as err:
            logger.warning("engine cache: could not discard %s: %s", key.digest()[:12], err)

    def _discard(
        self, key: EngineCacheKey, reason: str, generation: int | None, meta: object
    ) -> None:
        logger.warning(
            "engine cache: discarding gs://%s/%s: %s",
            self.bucket_name,
            self.object_name(key, ""),
            reason,
        )
        # Only delete the metadata generation we judged; a fixed entry written since survives.
        _delete(self._bucket.blob(self.object_name(key, METADATA_NAME)), generation)  # type: ignore[attr-defined]
        if isinstance(meta, dict) and isinstance(meta.get("engine_object"), str):
            name = str(meta["engine_object"])
            if re.fullmatch(r"[0-9a-f]{64}\.engine", name):
                _delete(self._bucket.blob(self.object_name(key, name)))  # type: ignore[attr-defined]


def _ensure_object(blob: object, data: bytes, sha256: str) -> bool:
    """Create the content-addressed engine object; True when this call created it."""
    from google.api_core import exceptions as gexc

    try:
        blob.upload_from_string(  # type: ignore[attr-defined]
            data, content_type="application/octet-stream", if_generation_match=0
        )
        return True
    except gexc.PreconditionFailed:
        pass
    # It exists: normally the same bytes (same name = same sha256), but check rather than
    # publish metadata that points at an object someone damaged.
    if hashlib.sha256(blob.download_as_bytes()).hexdigest() == sha256:  # type: ignore[attr-defined]
        return False
    _delete(blob)
    blob.upload_from_string(data, content_type="application/octet-stream", if_generation_match=0)  # type: ignore[attr-defined]
    return True


def _delete(blob: object, generation: int | None = None) -> None:
    from google.api_core import exceptions as gexc

    try:
        if generation is None:
            blob.delete()  # type: ignore[attr-defined]
        else:
            blob.delete(if_generation_match=generation)  # type: ignore[attr-defined]
    except (gexc.NotFound, gexc.PreconditionFailed):
        pass  # already gone, or replaced by a newer entry we must not delete
