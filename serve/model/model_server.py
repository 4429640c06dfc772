"""The model deployment: one per model, dynamic batching over its loaded versions.

A whole request crosses into the replica as one call (:meth:`ModelServer.infer_many`
with every image of a message or HTTP call); its items join the replica's
:class:`~serve.model.batcher.BatchQueue` individually, so batches fill from many calls.

Versions: the newest version that loads is served; a version that fails to load
(bad config, an ONNX file the parser rejects, a half-uploaded file) is
quarantined with an ERROR naming the cause and never retried until it changes,
so a bad upload never takes serving down. The replica starts even when the
repository has no version of its model yet and picks one up when it appears.
New versions are loaded and warmed up in the background *before* they become
the default, so a version change does not put a cold engine in front of traffic.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any

from serve import metrics
from serve.engines.base import engine_healthy
from serve.engines.cache import EngineCache
from serve.model.batch import (
    BatchItem,
    ItemOutcome,
    LoadedVersion,
    run_batch,
    validate_item,
)
from serve.model.batcher import BatchQueue, DeadlineExceeded, Overloaded
from serve.model.loader import load_version
from serve.model.repository import ModelRepository
from serve.model.signature import ModelSignature, signature_of
from serve.model_config import InputSpec, PreprocessSpec
from shared.config import load_settings
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError
from shared.logging import configure_json_logging

logger = logging.getLogger(__name__)

MAX_LOADED_VERSIONS = 2
DEFAULT_QUEUE_CAPACITY = 512


@dataclasses.dataclass(frozen=True, slots=True)
class VersionInfo:
    """What the ingress needs to preprocess for a version."""

    model: str
    version: str
    input: InputSpec
    preprocess: PreprocessSpec


@dataclasses.dataclass(frozen=True, slots=True)
class Rejection:
    """A permanent error crossing the deployment boundary as a value.

    Ray wraps exceptions raised in a replica, and a wrapped exception cannot
    always be matched by type in the caller; a value always can.
    """

    reason: ErrorReason
    message: str

    def to_error(self) -> PermanentError:
        return PermanentError(self.reason, self.message)


@dataclasses.dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure for one item, as a value; ``overloaded`` asks the caller to back off."""

    message: str
    overloaded: bool = False
    retry_after_s: float = 1.0


@dataclasses.dataclass(slots=True)
class _Queued:
    """An item in the batch queue, holding the version it was validated against."""

    item: BatchItem
    loaded: LoadedVersion


class ModelServer:
    """Serves every version of one model."""

    def __init__(self, model: str, poll_interval_s: float | None = None) -> None:
        configure_json_logging()
        settings = load_settings()
        self._model = model
        self._work_dir = Path(settings.engine_cache_dir)
        self._repo = ModelRepository(settings.model_repository, self._work_dir)
        self._cache = EngineCache.from_settings(settings.engine_cache_dir, settings.engine_cache_uri)
        self._versions: OrderedDict[str, LoadedVersion] = OrderedDict()
        self._quarantined: dict[str, str] = {}
        self._users: Counter[int] = Counter()  # in-flight items per loaded version (by id)
        self._retired: dict[int, LoadedVersion] = {}
        self._batch_sizes: Counter[int] = Counter()
        self._load_lock = asyncio.Lock()
        self._fault: str | None = None
        self._default: str | None = None
        capacity = int(os.environ.get("TRIGGERFISH_MAX_QUEUED", DEFAULT_QUEUE_CAPACITY))
        self._queue: BatchQueue[_Queued, ItemOutcome] = BatchQueue(self._run, 8, 0.005, max(capacity, 64))
        self._poll_interval_s = poll_interval_s or float(os.environ.get("TRIGGERFISH_REPOSITORY_POLL_S", "30"))
        self._load_newest_loadable(self._repo.models().get(model, []))
        # Started from the first call: __init__ may run off the replica's event loop.
        self._watcher: asyncio.Task[None] | None = None

    # -- versions --------------------------------------------------------------------------
    def _load_newest_loadable(self, versions: list[str]) -> None:
        """Load the newest version that loads; quarantine the ones that do not."""
        for version in reversed(versions):
            if version in self._quarantined:
                continue
            try:
                loaded = self._load(version)
            except Exception as err:  # noqa: BLE001 - any version that fails to load is quarantined
                self._quarantine(version, err)
                continue
            self._versions[version] = loaded
            self._promote(version)
            return
        logger.warning("no loadable version of %s yet (quarantined: %s)", self._model, self._quarantined)

    def _load(self, version: str) -> LoadedVersion:
        mv = self._repo.resolve(self._model, version)
        return load_version(mv, self._cache, self._work_dir)

    def _quarantine(self, version: str, err: BaseException) -> None:
        self._quarantined[version] = f"{type(err).__name__}: {err}"
        logger.error(
            "version %s/%s refused and quarantined: %s", self._model, version, err,
            extra={"model": self._model, "version": version},
        )  # fmt: skip

    def _promote(self, version: str) -> None:
        previous, self._default = self._default, version
        batching = self._versions[version].config.batching
        self._queue.configure(batching.max_batch_size, batching.batch_wait_timeout_ms / 1000, self._queue.capacity)
        if previous != version:
            logger.info("default version of %s: %s -> %s", self._model, previous, version)
        metrics.record_loaded(self._model, {v: lv.engine.backend_name for v, lv in self._versions.items()})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Change batching at runtime (``user_config`` of the deployment)."""
        q = self._queue
        q.configure(
            int(user_config.get("max_batch_size", q.max_batch_size)),
            float(user_config.get("batch_wait_timeout_ms", q.max_wait_s * 1000)) / 1000,
            int(user_config.get("max_queued", q.capacity)),
        )

    async def _get(self, version: str | None) -> LoadedVersion:
        self._start_watcher()
        wanted = version or self._default
        if wanted is None:
            raise TransientError(f"no version of model {self._model} is loaded yet")
        loaded = self._versions.get(wanted)
        if loaded is not None:
            self._versions.move_to_end(wanted)
            return loaded
        if wanted in self._quarantined:
            raise PermanentError(
                ErrorReason.UNKNOWN_VERSION,
                f"version {self._model}/{wanted} is quarantined: {self._quarantined[wanted]}",
            )
        async with self._load_lock:
            if wanted not in self._versions:
                try:
                    loaded = await asyncio.to_thread(self._load, wanted)
                except ConfigError as err:
                    self._quarantine(wanted, err)
                    raise PermanentError(
                        ErrorReason.UNKNOWN_VERSION, f"version {self._model}/{wanted} cannot be served: {err}"
                    ) from err
                self._versions[wanted] = loaded
                self._evict()
        return self._versions[wanted]

    def _evict(self) -> None:
        while len(self._versions) > MAX_LOADED_VERSIONS:
            oldest = next(v for v in self._versions if v != self._default)
            loaded = self._versions.pop(oldest)
            # Items already queued for it still run; the last one closes the engine.
            if self._users[id(loaded)]:
                self._retired[id(loaded)] = loaded
            else:
                self._close_later(loaded)
            logger.info("unloaded %s/%s", self._model, oldest)
        metrics.record_loaded(self._model, {v: lv.engine.backend_name for v, lv in self._versions.items()})

    def _close_later(self, loaded: LoadedVersion) -> None:
        asyncio.get_running_loop().run_in_executor(None, loaded.engine.close)

    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._poll_interval_s))

    async def _watch(self, interval: float) -> None:
        """Promote a newly published version only once it is loaded and warm."""
        while True:
            await asyncio.sleep(interval)
            try:
                versions = (await asyncio.to_thread(self._repo.refresh)).get(self._model, [])
                candidates = [v for v in versions if v not in self._quarantined]
                if not candidates or candidates[-1] == self._default:
                    continue
                newest = candidates[-1]
                if self._default is not None and versions.index(newest) < versions.index(self._default):
                    continue  # never step back to an older version on its own
                async with self._load_lock:
                    try:
                        loaded = await asyncio.to_thread(self._load, newest)
                    except Exception as err:  # noqa: BLE001 - a bad upload must not take serving down
                        self._quarantine(newest, err)
                        continue
                    self._versions[newest] = loaded
                    self._promote(newest)
                    self._evict()
            except Exception:  # noqa: BLE001 - keep serving the current version
                logger.exception("checking for new versions of %s failed", self._model)

    # -- calls from the ingress ------------------------------------------------------------
    async def describe(self, version: str | None = None) -> VersionInfo | Rejection | Retry:
        """Resolve ``version`` (default: the current default) and load it if needed."""
        try:
            loaded = await self._get(version)
        except PermanentError as err:
            return Rejection(err.reason, err.message)
        except TransientError as err:
            return Retry(str(err))
        cfg = loaded.config
        return VersionInfo(self._model, loaded.version, cfg.input, cfg.preprocess)

    async def signature(self, version: str | None = None) -> ModelSignature | Rejection | Retry:
        """Tensors, labels and backend of ``version`` (default: the current default), for metadata."""
        try:
            loaded = await self._get(version)
        except PermanentError as err:
            return Rejection(err.reason, err.message)
        except TransientError as err:
            return Retry(str(err))
        versions = [v for v in self._repo.models().get(self._model, []) if v not in self._quarantined]
        return signature_of(loaded, versions, ready=self._fault is None)

    async def infer_many(
        self, items: list[BatchItem], deadline: float | None = None
    ) -> list[ItemOutcome | Rejection | Retry]:
        """Run every item of one request; one answer per item, in order.

        A bad item is rejected before it joins a batch, so it never fails its neighbours.
        """
        return list(await asyncio.gather(*(self._infer_one(item, deadline) for item in items)))

    async def _infer_one(self, item: BatchItem, deadline: float | None) -> ItemOutcome | Rejection | Retry:
        if self._fault is not None:
            return Retry(f"model replica unhealthy: {self._fault}")
        try:
            loaded = await self._get(item.version)
            validate_item(item, loaded.config)
        except PermanentError as err:
            return Rejection(err.reason, err.message)
        except TransientError as err:
            return Retry(str(err))
        key = id(loaded)
        self._users[key] += 1
        try:
            queued = _Queued(dataclasses.replace(item, enqueued_at=time.monotonic()), loaded)
            return await self._queue.submit(queued, deadline)
        except Overloaded as err:
            metrics.record_shed(self._model, "model")
            return Retry(str(err), overloaded=True, retry_after_s=err.retry_after_s)
        except (DeadlineExceeded, TransientError) as err:
            return Retry(str(err))
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                if key in self._retired:
                    self._close_later(self._retired.pop(key))

    async def _run(self, batch: list[_Queued]) -> list[ItemOutcome]:
        self._batch_sizes[len(batch)] += 1
        outcomes: list[ItemOutcome | None] = [None] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, queued in enumerate(batch):
            groups.setdefault(id(queued.loaded), []).append(i)
        for indices in groups.values():
            loaded = batch[indices[0]].loaded
            # Inference blocks (ONNX Runtime / TensorRT sync); keep it off the event loop.
            try:
                results = await asyncio.to_thread(run_batch, loaded, [batch[i].item for i in indices])
            except TransientError as err:
                self._fault = str(err)
                logger.error("engine fault on %s/%s; replica unhealthy: %s", self._model, loaded.version, err)
                raise
            metrics.record_outcomes(self._model, loaded.version, results, self._queue.depth)
            for i, outcome in zip(indices, results, strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    async def stats(self) -> dict[str, Any]:
        """Batch sizes formed so far, loaded and quarantined versions, queue depth."""
        return {
            "model": self._model,
            "default_version": self._default,
            "loaded_versions": list(self._versions),
            "quarantined_versions": dict(self._quarantined),
            "backends": {v: lv.engine.backend_name for v, lv in self._versions.items()},
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "queue_depth": self._queue.depth,
            "healthy": self._fault is None,
        }

    def check_health(self) -> None:
        """Serve replaces a replica whose engine faulted (a sticky device error, a wedged provider)."""
        if self._fault is None:
            broken = [v for v, lv in self._versions.items() if not engine_healthy(lv.engine)]
            if broken:
                self._fault = f"engine of version(s) {broken} reports a device fault"
        if self._fault is not None:
            raise RuntimeError(f"model {self._model}: {self._fault}")
