"""The model deployment: one per model, dynamic batching over its loaded versions.

Loading happens in ``__init__`` (Serve reports the replica ready only after
that and a warm-up batch). New versions published to the repository are loaded
and warmed up in the background *before* they become the default, so a
version change does not put a cold engine in front of live traffic.
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

from ray import serve

from serve.batch import (
    BatchItem,
    ItemOutcome,
    LoadedVersion,
    group_by_version,
    run_batch,
    validate_item,
)
from serve.engines.cache import EngineCache
from serve.loader import load_version
from serve.model_config import InputSpec, PreprocessSpec
from serve.repository import ModelRepository
from shared.config import load_settings
from shared.errors import ErrorReason, PermanentError
from shared.logging import configure_json_logging

logger = logging.getLogger(__name__)

MAX_LOADED_VERSIONS = 2


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


class ModelServer:
    """Serves every version of one model; ``infer`` is the entry point for one image."""

    def __init__(self, model: str, poll_interval_s: float | None = None) -> None:
        configure_json_logging()
        settings = load_settings()
        self._model = model
        self._work_dir = Path(settings.engine_cache_dir)
        self._repo = ModelRepository(settings.model_repository, self._work_dir)
        self._cache = EngineCache.from_settings(settings.engine_cache_dir, settings.engine_cache_uri)
        self._versions: OrderedDict[str, LoadedVersion] = OrderedDict()
        self._batch_sizes: Counter[int] = Counter()
        self._load_lock = asyncio.Lock()
        newest = self._repo.resolve(model)
        self._default = newest.version
        self._versions[newest.version] = load_version(newest, self._cache, self._work_dir)
        self._apply_batching(self._versions[newest.version])
        self._poll_interval_s = poll_interval_s or float(
            os.environ.get("TRIGGERFISH_REPOSITORY_POLL_S", "30")
        )
        # Started from the first call: __init__ may run off the replica's event loop.
        self._watcher: asyncio.Task[None] | None = None

    def _apply_batching(self, loaded: LoadedVersion) -> None:
        batching = loaded.config.batching
        self._batched.set_max_batch_size(batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_ms / 1000)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Change batching at runtime (``user_config`` of the deployment)."""
        if "max_batch_size" in user_config:
            self._batched.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_ms" in user_config:
            self._batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_ms"]) / 1000)

    async def describe(self, version: str | None = None) -> VersionInfo | Rejection:
        """Resolve ``version`` (default: the current default) and load it if needed."""
        try:
            loaded = await self._get(version)
        except PermanentError as err:
            return Rejection(err.reason, err.message)
        cfg = loaded.config
        return VersionInfo(self._model, loaded.version, cfg.input, cfg.preprocess)

    async def infer(self, item: BatchItem) -> ItemOutcome | Rejection:
        """Validate one item, then let it join a batch; a bad item never joins one."""
        try:
            loaded = await self._get(item.version)
            validate_item(item, loaded.config)
        except PermanentError as err:
            return Rejection(err.reason, err.message)
        return await self._batched(dataclasses.replace(item, enqueued_at=time.monotonic()))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, items: list[BatchItem]) -> list[ItemOutcome]:
        self._batch_sizes[len(items)] += 1
        outcomes: list[ItemOutcome | None] = [None] * len(items)
        for version, indices in group_by_version(items).items():
            loaded = self._versions[version]
            group = [items[i] for i in indices]
            # Inference blocks (ONNX Runtime / TensorRT sync); keep it off the event loop.
            results = await asyncio.to_thread(run_batch, loaded, group)
            for i, outcome in zip(indices, results, strict=True):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    async def stats(self) -> dict[str, Any]:
        """Batch sizes formed so far and the loaded versions."""
        return {
            "model": self._model,
            "default_version": self._default,
            "loaded_versions": list(self._versions),
            "backends": {v: lv.engine.backend_name for v, lv in self._versions.items()},
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
        }

    def check_health(self) -> None:
        if not self._versions:
            raise RuntimeError(f"model {self._model} has no loaded version")

    async def _get(self, version: str | None) -> LoadedVersion:
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._poll_interval_s))
        wanted = version or self._default
        loaded = self._versions.get(wanted)
        if loaded is not None:
            self._versions.move_to_end(wanted)
            return loaded
        async with self._load_lock:
            if wanted not in self._versions:
                mv = await asyncio.to_thread(self._repo.resolve, self._model, wanted)
                self._versions[wanted] = await asyncio.to_thread(
                    load_version, mv, self._cache, self._work_dir
                )
                self._evict()
        return self._versions[wanted]

    def _evict(self) -> None:
        while len(self._versions) > MAX_LOADED_VERSIONS:
            oldest = next(v for v in self._versions if v != self._default)
            self._versions.pop(oldest).engine.close()
            logger.info("unloaded %s/%s", self._model, oldest)

    async def _watch(self, interval: float) -> None:
        """Promote a newly published version only once it is loaded and warm."""
        while True:
            await asyncio.sleep(interval)
            try:
                versions = (await asyncio.to_thread(self._repo.refresh)).get(self._model, [])
                if versions and versions[-1] != self._default:
                    await self._get(versions[-1])
                    logger.info("default version of %s: %s -> %s", self._model, self._default, versions[-1])
                    self._default = versions[-1]
                    self._apply_batching(self._versions[self._default])
            except Exception:  # noqa: BLE001 - keep serving the current version
                logger.exception("checking for new versions of %s failed", self._model)


