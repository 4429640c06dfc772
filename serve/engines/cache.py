"""The engine cache: memory LRU -> local disk -> shared ``gs://`` prefix -> build.

A serialized engine (TensorRT plan, or ORT-optimized ONNX) is only valid for
the exact ONNX bytes, backend version, device, precision and batch profile it
was built for. :class:`EngineCacheKey` names all of them; every stored entry
carries the key as JSON metadata plus the SHA-256 of its bytes, and every level
re-checks both before handing bytes out. An entry that fails either check, or
that the backend refuses to deserialize, is discarded (and logged) and rebuilt:
a cached engine is never trusted on hardware or software it was not built for.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, TypeVar

from serve.cpus import in_background
from serve.engines._cache_key import CACHE_FORMAT_VERSION, EngineCacheKey
from serve.engines._cache_stores import (
    CachedEntry,
    DiskEngineStore,
    EngineStore,
    GcsEngineStore,
    MemoryLevel,
    write_atomic,
)
from shared.errors import ConfigError, TriggerfishError

logger = logging.getLogger(__name__)

#: ``shared`` is a shared filesystem mount used instead of ``gs://``.
CacheLevel = Literal["memory", "disk", "gcs", "shared", "built"]
T = TypeVar("T")

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheLevel",
    "CacheReport",
    "CacheResult",
    "DiskEngineStore",
    "EngineBuildError",
    "EngineCache",
    "EngineCacheKey",
    "GcsEngineStore",
    "IncompatibleEngineError",
    "write_atomic",
]


class EngineBuildError(TriggerfishError):
    """Building an engine from ONNX failed (parser or builder error)."""


class IncompatibleEngineError(TriggerfishError):
    """The backend refused to deserialize cached bytes (other version/device, or corrupt)."""


@dataclass(frozen=True, slots=True)
class CacheReport:
    """Where an engine came from and what it cost, for logs, results and the CLI.

    Attributes:
        level: ``memory`` | ``disk`` | ``gcs`` | ``shared`` | ``built``.
        key_digest: :meth:`EngineCacheKey.digest` of the entry.
        engine_bytes: Size of the serialized engine.
        engine_sha256: SHA-256 of the serialized engine.
        lookup_seconds: Time spent checking cache levels (including downloads).
        build_seconds: Time spent building (0 on a hit).
        load_seconds: Time spent deserializing/creating the engine.
        discarded: One line per rejected entry (``"disk: sha256 mismatch"``).
        info: The entry's recorded build information (model, builder, validation verdict).
    """

    level: CacheLevel
    key_digest: str
    engine_bytes: int
    engine_sha256: str
    lookup_seconds: float
    build_seconds: float
    load_seconds: float
    discarded: tuple[str, ...] = ()
    info: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CacheResult(Generic[T]):
    """A loaded engine and its :class:`CacheReport`."""

    value: T
    report: CacheReport


class EngineCache:
    """Looks engines up level by level, builds on a miss and publishes what it built.

    Args:
        disk: Local directory level (per node), or None.
        shared: Shared level (``gs://bucket/prefix``), or None.
        memory_entries: Engines kept in this process's LRU (0 disables it).
    """

    def __init__(
        self,
        disk: EngineStore | None = None,
        shared: EngineStore | None = None,
        memory_entries: int = 4,
    ) -> None:
        if memory_entries < 0:
            raise ValueError(f"memory_entries must be >= 0, got {memory_entries}")
        self.memory = MemoryLevel(memory_entries)
        self.disk = disk
        self.shared = shared
        self._key_locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        engine_cache_dir: str,
        engine_cache_uri: str = "",
        *,
        memory_entries: int = 4,
        gcs_client: object | None = None,
    ) -> EngineCache:
        """Build the cache from ``Settings.engine_cache_dir`` and ``Settings.engine_cache_uri``.

        ``engine_cache_uri`` may be empty (no shared level), a ``gs://bucket/prefix``, or a
        filesystem path (a shared mount, used like the disk level).
        """
        disk = DiskEngineStore(Path(engine_cache_dir)) if engine_cache_dir else None
        shared: EngineStore | None = None
        if engine_cache_uri.startswith("gs://"):
            shared = GcsEngineStore(engine_cache_uri, client=gcs_client)
        elif engine_cache_uri.startswith(("/", ".")):
            shared = DiskEngineStore(Path(engine_cache_uri), level="shared")
        elif engine_cache_uri:
            raise ConfigError(
                f"engine cache URI must be gs://... or a path, got {engine_cache_uri!r}"
            )
        return cls(disk=disk, shared=shared, memory_entries=memory_entries)

    def _lock_for(self, digest: str) -> threading.Lock:
        with self._locks_guard:
            return self._key_locks.setdefault(digest, threading.Lock())

    def get_or_build(
        self,
        key: EngineCacheKey,
        *,
        build: Callable[[], bytes],
        load: Callable[[bytes], T],
        validate: Callable[[T], Mapping[str, object] | None] | None = None,
        info: Mapping[str, object] | None = None,
    ) -> CacheResult[T]:
        """Return a loaded engine for ``key``, building and publishing it on a miss.

        Args:
            build: Produces serialized engine bytes (slow).
            load: Turns bytes into an engine; raises :class:`IncompatibleEngineError` when
                the backend refuses them, which discards that entry and goes on.
            validate: Runs on a freshly built engine *before* anything is published; raise to
                refuse it (nothing is cached). Its returned mapping is stored as
                ``info["validation"]`` so later hits can report it.
            info: Extra build information stored in the entry's metadata.

        Raises:
            EngineBuildError: From ``build``. Whatever ``validate`` raises.
        """
        digest = key.digest()
        with self._lock_for(digest):  # one build per key per process, not one per caller
            return self._get_or_build(key, digest, build, load, validate, dict(info or {}))

    def _get_or_build(
        self,
        key: EngineCacheKey,
        digest: str,
        build: Callable[[], bytes],
        load: Callable[[bytes], T],
        validate: Callable[[T], Mapping[str, object] | None] | None,
        info: dict[str, object],
    ) -> CacheResult[T]:
        discarded: list[str] = []
        lookups = self._lookups(key, digest)
        lookup_s = 0.0
        while True:
            t0 = time.perf_counter()
            found = next(lookups, None)
            lookup_s += time.perf_counter() - t0
            if found is None:
                break
            level, entry = found
            t0 = time.perf_counter()
            try:
                value = load(entry.data)
            except IncompatibleEngineError as err:
                reason = f"{level}: backend refused the engine ({err})"
                logger.warning("engine cache %s: %s; discarding it", digest[:12], reason)
                discarded.append(reason)
                self._discard(level, key, reason)
                continue
            load_s = time.perf_counter() - t0
            self._promote(level, key, digest, entry)
            report = _report(level, digest, entry, lookup_s, 0.0, load_s, discarded)
            logger.info(
                "engine %s: %s hit (%d bytes, lookup %.3fs, load %.3fs)",
                digest[:12],
                level,
                len(entry.data),
                lookup_s,
                load_s,
            )
            return CacheResult(value, report)
        return self._build(key, digest, build, load, validate, info, lookup_s, discarded)

    def _lookups(self, key: EngineCacheKey, digest: str):  # noqa: ANN202 - generator of (level, entry)
        entry = self.memory.get(digest)
        if entry is not None:
            if entry.sha256 == hashlib.sha256(entry.data).hexdigest() and entry.key == key:
                yield "memory", entry
            else:  # cannot happen without a bug; never serve it anyway
                logger.error("engine cache %s: memory entry failed verification", digest[:12])
                self.memory.discard(digest)
        for store in (self.disk, self.shared):
            if store is None:
                continue
            entry = store.fetch(key)
            if entry is not None:
                yield store.level, entry

    def _discard(self, level: str, key: EngineCacheKey, reason: str) -> None:
        if level == "memory":
            self.memory.discard(key.digest())
        for store in (self.disk, self.shared):
            if store is not None and store.level == level:
                store.discard(key, reason)

    def _promote(self, level: str, key: EngineCacheKey, digest: str, entry: CachedEntry) -> None:
        """Copy a hit into the faster levels so the next lookup stops earlier."""
        if self.shared is not None and level == self.shared.level:
            self._store_locally(key, entry)
        else:
            self.memory.put(digest, entry)

    def _build(
        self,
        key: EngineCacheKey,
        digest: str,
        build: Callable[[], bytes],
        load: Callable[[bytes], T],
        validate: Callable[[T], Mapping[str, object] | None] | None,
        info: dict[str, object],
        lookup_s: float,
        discarded: list[str],
    ) -> CacheResult[T]:
        logger.info(
            "engine %s: not cached, building (%s %s)", digest[:12], key.backend, key.precision
        )
        t0 = time.perf_counter()
        # At a lower priority: a build beside a serving version (a rollout) leaves the
        # cores to its batches; the engine is opened below, at the caller's priority.
        data = in_background(build)
        build_s = time.perf_counter() - t0
        if not isinstance(data, bytes) or not data:
            raise EngineBuildError(f"engine build for {digest[:12]} returned no bytes")
        t0 = time.perf_counter()
        value = load(data)  # a fresh build the backend refuses is a real error: let it raise
        load_s = time.perf_counter() - t0
        info = {**info, "build_seconds": round(build_s, 3), "built_at": time.time()}
        if validate is not None:
            try:
                verdict = validate(value)
            except BaseException:
                _close(value)
                raise
            if verdict is not None:
                info["validation"] = dict(verdict)
        entry = CachedEntry(key=key, data=data, sha256=hashlib.sha256(data).hexdigest(), info=info)
        if self.shared is not None:
            published = self.shared.store(key, data, info)
            if published.sha256 != entry.sha256:
                value, entry, load_s = self._adopt_winner(value, entry, published, load, load_s)
        self._store_locally(key, entry)
        report = _report("built", digest, entry, lookup_s, build_s, load_s, discarded)
        logger.info(
            "engine %s: built in %.2fs (%d bytes), loaded in %.3fs",
            digest[:12],
            build_s,
            len(entry.data),
            load_s,
        )
        return CacheResult(value, report)

    def _adopt_winner(
        self,
        ours: T,
        entry: CachedEntry,
        winner: CachedEntry,
        load: Callable[[bytes], T],
        load_s: float,
    ) -> tuple[T, CachedEntry, float]:
        """Another replica published first: run its engine so that all replicas agree."""
        digest = entry.key.digest()[:12]
        t0 = time.perf_counter()
        try:
            value = load(winner.data)
        except IncompatibleEngineError as err:  # same key, so unexpected; ours is fine
            logger.warning(
                "engine %s: the published engine does not load (%s); keeping ours", digest, err
            )
            return ours, entry, load_s
        logger.info("engine %s: another builder published first; using its engine", digest)
        _close(ours)
        return value, winner, time.perf_counter() - t0

    def _store_locally(self, key: EngineCacheKey, entry: CachedEntry) -> None:
        self.memory.put(key.digest(), entry)
        if self.disk is None:
            return
        try:
            self.disk.store(key, entry.data, entry.info)
        except OSError as err:  # a full or read-only disk costs the next start a lookup, no more
            logger.warning("engine cache: could not write %s to disk: %s", key.digest()[:12], err)


def _close(value: object) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        close()


def _report(
    level: CacheLevel,
    digest: str,
    entry: CachedEntry,
    lookup_s: float,
    build_s: float,
    load_s: float,
    discarded: list[str],
) -> CacheReport:
    return CacheReport(
        level=level,
        key_digest=digest,
        engine_bytes=len(entry.data),
        engine_sha256=entry.sha256,
        lookup_seconds=lookup_s,
        build_seconds=build_s,
        load_seconds=load_s,
        discarded=tuple(discarded),
        info=dict(entry.info),
    )
