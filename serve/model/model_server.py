"""The model deployment: one per model, dynamic batching over its loaded versions.

A whole request crosses into the replica as one call (:meth:`ModelServer.infer_many`
with every image of a message or HTTP call); its items join the replica's
:class:`~serve.model.batcher.BatchQueue` individually, so batches fill from many calls.

Versions: the newest version that loads is served. What happens to one that does
not load depends on the cause (:func:`serve.engines.errors.load_error_is_permanent`):

- *permanent* (a config the replica refuses, ``max_batch_size`` above the queue
  capacity, an ONNX file the parser rejects, a labels file it names missing):
  the version is *quarantined* with an ERROR naming the cause. Quarantine lasts
  until the version's files change (their fingerprint is re-checked at every
  poll), so a half-uploaded version is served once its upload completes;
- *transient* (I/O, Cloud Storage, out of memory, a copy raced by another
  replica): the load is retried with exponential backoff
  (:data:`LOAD_BACKOFF_S`), and the current default keeps serving meanwhile.

A version whose engine fails the blank-image probe :data:`RUNTIME_FAULT_LIMIT`
times in this replica's life is quarantined as a *runtime fault* (released, as
above, when its files change) and the replica falls back to the newest other
version; a sticky device fault instead makes the replica unhealthy, so that
Serve replaces it. The replica starts even when the repository has no version
of its model yet and picks one up when it appears.

New versions are loaded in the background by one loader thread (an engine build
at a lower OS priority, :func:`serve.cpus.in_background`; the engine opened at the
replica's own, so that its worker threads serve at that priority), warmed up at a
pace, and only then become the default, so a version change neither puts a cold
engine in front of traffic nor starves the batches being served. Items that name
a version newer than this replica's default (another replica promoted it first)
wake the watcher (coalesced: one repository check per :data:`WAKE_CHECK_GAP_S`).
Meanwhile an item
whose caller asked for the default is served by this replica's default (when that
version takes the item as prepared), and one whose caller named the version is
answered with :class:`Retry`: never with a permanent ``unknown_version``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from serve import metrics
from serve.engines.base import engine_healthy
from serve.engines.cache import EngineCache
from serve.engines.errors import is_out_of_memory, load_error_is_permanent
from serve.gpus import onnxruntime_arena_limit
from serve.imaging.cpu_decode import prepare_image
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import (
    AnyItem,
    BatchItem,
    EncodedItem,
    EngineFailure,
    ItemOutcome,
    LoadedVersion,
    run_batch,
    validate_item,
)
from serve.model.batcher import BatchQueue, DeadlineExceeded, Overloaded
from serve.model.chaos import maybe_fail_load
from serve.model.encoded_batch import run_encoded_batch
from serve.model.loader import load_version, warm_up
from serve.model.repository import ModelRepository
from serve.model.signature import ModelSignature, signature_of
from serve.model_config import ModelConfig, preparation_key
from shared.config import load_settings
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError
from shared.logging import configure_json_logging
from shared.messages import Priority
from shared.results import version_sort_key

logger = logging.getLogger(__name__)

MAX_LOADED_VERSIONS = 2
DEFAULT_QUEUE_CAPACITY = 512
#: Seconds to wait before retrying a version after its 1st, 2nd, ... transient load failure.
LOAD_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
#: Blank-probe engine failures of one version before it is quarantined as a runtime fault.
RUNTIME_FAULT_LIMIT = 3
#: Seconds between two repository checks that calls asked for (they never wait for the poll).
WAKE_CHECK_GAP_S = 0.5
#: A background warm-up sleeps this many times each warm-up batch's duration after it.
WARM_UP_PAUSE = 1.0


@dataclasses.dataclass(slots=True)
class _Queued:
    """An item in the batch queue, holding the version it was validated against."""

    item: AnyItem
    loaded: LoadedVersion


@dataclasses.dataclass(slots=True)
class _Quarantine:
    """A version refused for good, until its files change (``fingerprint``; None: not read yet)."""

    cause: str
    fingerprint: str | None
    runtime: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Backoff:
    """A version whose last load failed transiently: retried from ``due`` (monotonic)."""

    failures: int
    due: float
    cause: str


@dataclasses.dataclass(frozen=True, slots=True)
class _Attempt:
    """The outcome of one load attempt, classified where it ran."""

    version: str
    loaded: LoadedVersion | None = None
    error: BaseException | None = None
    permanent: bool = False
    fingerprint: str | None = None


def _absent(err: BaseException) -> bool:
    """The repository does not list the version (deleted, or not visible yet): not its files' fault."""
    return isinstance(err, PermanentError) and err.reason in (ErrorReason.UNKNOWN_VERSION, ErrorReason.UNKNOWN_MODEL)


def newer(version: str, than: str | None) -> bool:
    """``version`` sorts after ``than`` (numerically for numeric versions); anything is newer than None."""
    return than is None or version_sort_key(version) > version_sort_key(than)


def decode_on_cpu(item: EncodedItem, config: ModelConfig, max_pixels: int) -> BatchItem:
    """``item``'s bytes decoded here, for a version that does not decode on the GPU.

    Raises:
        PermanentError: the bytes are not an image this service reads, or too large.
        TransientError: out of memory decoding.
    """
    try:
        image = prepare_image(item.data, config.input, config.preprocess, max_pixels)
    except (PermanentError, TransientError):
        raise
    except Exception as err:  # noqa: BLE001 - pinned on this one input's bytes, as at the ingress
        if is_out_of_memory(err):
            raise TransientError(f"out of memory decoding an image: {err!r}"[:500]) from err
        raise PermanentError(ErrorReason.NOT_AN_IMAGE, f"cannot decode image: {err!r}"[:500]) from err
    return BatchItem(
        image.pixels, image.geometry, item.version, item.enqueued_at, deadline=item.deadline,
        priority=item.priority,
    )  # fmt: skip


def _run_group(loaded: LoadedVersion, items: list[AnyItem]) -> list[ItemOutcome]:
    """One version's share of a batch: decoded images through :func:`run_batch`, encoded
    ones through :func:`run_encoded_batch`; outcomes in the items' order."""
    encoded = [i for i, item in enumerate(items) if isinstance(item, EncodedItem)]
    if not encoded:
        return run_batch(loaded, items)  # type: ignore[arg-type]
    if len(encoded) == len(items):
        return run_encoded_batch(loaded, items)  # type: ignore[arg-type]
    decoded = [i for i, item in enumerate(items) if not isinstance(item, EncodedItem)]
    outcomes: list[ItemOutcome | None] = [None] * len(items)
    for indices, run in ((decoded, run_batch), (encoded, run_encoded_batch)):
        for i, outcome in zip(indices, run(loaded, [items[i] for i in indices]), strict=True):  # type: ignore[operator]
            outcomes[i] = outcome
    return [o for o in outcomes if o is not None]


class ModelServer:
    """Serves every version of one model."""

    def __init__(
        self, model: str, poll_interval_s: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        configure_json_logging()
        settings = load_settings()
        self._model = model
        self._clock = clock
        self._work_dir = Path(settings.engine_cache_dir)
        self._decode_mode = settings.decode
        self._max_pixels = settings.max_image_pixels
        # Read once: a bad TRIGGERFISH_GPU_MEM_LIMIT_MB stops the replica at start.
        self._gpu_mem_limit = onnxruntime_arena_limit()
        self._repo = ModelRepository(settings.model_repository, self._work_dir)
        self._cache = EngineCache.from_settings(settings.engine_cache_dir, settings.engine_cache_uri)
        self._versions: OrderedDict[str, LoadedVersion] = OrderedDict()
        self._quarantine_entries: dict[str, _Quarantine] = {}
        self._backoff: dict[str, _Backoff] = {}
        self._runtime_faults: Counter[str] = Counter()
        self._load_failures: Counter[str] = Counter()  # transient load failures per version, ever
        self._users: Counter[int] = Counter()  # in-flight items per loaded version (by id)
        self._retired: dict[int, LoadedVersion] = {}
        self._batch_sizes: Counter[int] = Counter()
        self._load_lock = asyncio.Lock()
        self._fault: str | None = None
        self._default: str | None = None
        capacity = int(os.environ.get("TRIGGERFISH_MAX_QUEUED", DEFAULT_QUEUE_CAPACITY))
        self._queue: BatchQueue[_Queued, ItemOutcome] = BatchQueue(
            self._run, 8, 0.005, max(capacity, 64),
            settings.bulk_min_share, settings.live_headroom, settings.bulk_batch_while_live,
        )  # fmt: skip
        self._poll_interval_s = poll_interval_s or float(
            os.environ.get("TRIGGERFISH_REPOSITORY_POLL_S", "30")
        )
        # Background loads, one at a time (their engine builds run at a lower priority).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="version-loader")
        try:
            versions = self._repo.models().get(model, [])
        except Exception as err:  # noqa: BLE001 - start anyway; the watcher lists again
            logger.error("listing versions of %s failed at start-up: %s", model, err)
            versions = []
        self._load_newest_loadable(versions)
        # Started by the first call or health check: __init__ may run off the replica's event loop.
        self._watcher: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None

    @property
    def _quarantined(self) -> dict[str, str]:
        """Quarantined version -> its cause."""
        return {v: q.cause for v, q in self._quarantine_entries.items()}

    # -- loading ---------------------------------------------------------------------------
    def _load_newest_loadable(self, versions: list[str]) -> None:
        """Load the newest version that loads; older ones serve while a newer one is retried."""
        for version in reversed(versions):
            if version in self._quarantine_entries:
                continue
            loaded = self._settle(self._attempt(version, lambda v=version: self._load(v)))
            if loaded is None:
                continue
            self._versions[version] = loaded
            self._promote(version)
            return
        logger.warning("no loadable version of %s yet (quarantined: %s)", self._model, self._quarantined)

    def _load(self, version: str, warm: bool = True) -> LoadedVersion:
        maybe_fail_load(self._model, version)
        mv = self._repo.resolve(self._model, version)
        self._check_servable(version, mv.config)
        return load_version(
            mv, self._cache, self._work_dir, warm=warm, decode=self._decode_mode,
            max_pixels=self._max_pixels, gpu_mem_limit=self._gpu_mem_limit,
        )  # fmt: skip

    def _check_servable(self, version: str, config: ModelConfig) -> None:
        """Refuse, before anything is built, a version this replica's queue cannot batch."""
        if config.batching.max_batch_size > self._queue.capacity:
            raise ConfigError(
                f"version {self._model}/{version} has max_batch_size {config.batching.max_batch_size}, "
                f"above this replica's queue capacity {self._queue.capacity} (TRIGGERFISH_MAX_QUEUED)"
            )

    def _warm(self, loaded: LoadedVersion) -> LoadedVersion:
        """Warm up a version loaded next to the one serving, paced (see :func:`warm_up`)."""
        try:
            warm_up(loaded, pause=WARM_UP_PAUSE)
        except BaseException:
            loaded.engine.close()
            raise
        return loaded

    def _attempt(self, version: str, work: Callable[[], LoadedVersion]) -> _Attempt:
        """Run ``work`` (on any thread) and classify its failure; never raises.

        The files' fingerprint is taken *before* the load: an upload completing while
        the load fails then shows as a change at the next poll, never as the state
        the quarantine started from.
        """
        fingerprint = self._fingerprint(version)
        try:
            return _Attempt(version, loaded=work())
        except Exception as err:  # noqa: BLE001 - classified below, settled on the event loop
            permanent = load_error_is_permanent(err) and not _absent(err)
            return _Attempt(version, error=err, permanent=permanent, fingerprint=fingerprint if permanent else None)

    def _fingerprint(self, version: str) -> str | None:
        try:
            return self._repo.fingerprint(self._model, version)
        except TransientError as err:
            logger.warning("cannot fingerprint %s/%s: %s", self._model, version, err)
            return None

    def _settle(self, attempt: _Attempt) -> LoadedVersion | None:
        """Record a failed attempt as quarantine or backoff; the loaded version otherwise."""
        version, err = attempt.version, attempt.error
        if err is None:
            self._backoff.pop(version, None)
            return attempt.loaded
        if _absent(err):
            # Not listed (never published, or deleted): nothing to retry or refuse; every
            # caller asks the repository again (a listing), as a version may appear any time.
            return None
        if attempt.permanent:
            self._quarantine(version, err, attempt.fingerprint)
        else:
            self._load_failures[version] += 1
            previous = self._backoff.get(version)
            failures = previous.failures + 1 if previous else 1
            delay = LOAD_BACKOFF_S[min(failures, len(LOAD_BACKOFF_S)) - 1]
            self._backoff[version] = _Backoff(failures, self._clock() + delay, f"{type(err).__name__}: {err}")
            logger.warning(
                "loading %s/%s failed (%s, attempt %d); retrying in %.0fs: %s",
                self._model, version, type(err).__name__, failures, delay, err,
                extra={"model": self._model, "version": version},
            )  # fmt: skip
        return None

    def _quarantine(
        self, version: str, err: BaseException, fingerprint: str | None, *, runtime: bool = False
    ) -> None:
        self._quarantine_entries[version] = _Quarantine(f"{type(err).__name__}: {err}", fingerprint, runtime)
        self._backoff.pop(version, None)
        logger.error(
            "version %s/%s refused and quarantined until its files change: %s", self._model, version, err,
            extra={"model": self._model, "version": version},
        )  # fmt: skip

    def _refusal(self, version: str, for_item: bool) -> PermanentError | TransientError | None:
        """Why ``version`` cannot be loaded now, or None.

        An item's version was resolved by a replica that serves it: for an item
        every refusal is transient, so that no replica-local state becomes a
        permanent record.
        """
        quarantined = self._quarantine_entries.get(version)
        if quarantined is not None:
            message = f"version {self._model}/{version} is quarantined: {quarantined.cause}"
            if for_item:
                return TransientError(f"{message} (on this replica)")
            return PermanentError(ErrorReason.UNKNOWN_VERSION, message)
        backoff = self._backoff.get(version)
        if backoff is not None and self._clock() < backoff.due:
            return TransientError(
                f"version {self._model}/{version} failed to load ({backoff.cause}); "
                f"retrying in {backoff.due - self._clock():.0f}s"
            )
        return None

    def _promote(self, version: str) -> None:
        """Make ``version`` the default; its batching replaces the queue's."""
        batching = self._versions[version].config.batching
        self._queue.configure(batching.max_batch_size, batching.batch_wait_timeout_ms / 1000, self._queue.capacity)
        previous, self._default = self._default, version
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

    async def _get(self, version: str | None, *, for_item: bool = False) -> LoadedVersion:
        self._start_watcher()
        wanted = version or self._default
        if wanted is None:
            self._wake_watcher()
            raise TransientError(f"no version of model {self._model} is loaded yet")
        loaded = self._versions.get(wanted)
        if loaded is not None:
            self._versions.move_to_end(wanted)
            return loaded
        if (refused := self._refusal(wanted, for_item)) is not None:
            raise refused
        if for_item and self._default is not None and newer(wanted, self._default):
            # Another replica promoted it first: this one loads it in the background.
            self._wake_watcher()
            raise TransientError(
                f"version {self._model}/{wanted} is not loaded on this replica yet (default {self._default})"
            )
        async with self._load_lock:
            loaded = self._versions.get(wanted)
            if loaded is not None:  # loaded while this call waited for the lock
                return loaded
            if (refused := self._refusal(wanted, for_item)) is not None:
                raise refused
            attempt = await asyncio.to_thread(self._attempt, wanted, lambda: self._load(wanted))
            loaded = self._settle(attempt)
            if loaded is None:
                err = attempt.error
                if not for_item and (attempt.permanent or _absent(err)):  # type: ignore[arg-type]
                    if isinstance(err, PermanentError):
                        raise PermanentError(ErrorReason.UNKNOWN_VERSION, err.message) from err
                    raise PermanentError(
                        ErrorReason.UNKNOWN_VERSION, f"version {self._model}/{wanted} cannot be served: {err}"
                    ) from err
                raise TransientError(f"version {self._model}/{wanted} did not load: {err}") from err
            self._versions[wanted] = loaded
            self._evict()
        return loaded

    def _evict(self) -> None:
        while len(self._versions) > MAX_LOADED_VERSIONS:
            oldest = next(v for v in self._versions if v != self._default)
            self._unload(oldest)
        metrics.record_loaded(self._model, {v: lv.engine.backend_name for v, lv in self._versions.items()})

    def _unload(self, version: str) -> None:
        loaded = self._versions.pop(version)
        # Items already queued for it still run; the last one closes the engine.
        if self._users[id(loaded)]:
            self._retired[id(loaded)] = loaded
        else:
            self._close_later(loaded)
        logger.info("unloaded %s/%s", self._model, version)

    def _close_later(self, loaded: LoadedVersion) -> None:
        asyncio.get_running_loop().run_in_executor(None, loaded.engine.close)

    # -- the watcher -----------------------------------------------------------------------
    def _start_watcher(self) -> None:
        if self._watcher is None:
            self._wake = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(self._poll_interval_s))

    def _wake_watcher(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _watch(self, interval: float) -> None:
        """Poll the repository; sooner when a load is due for a retry or a call asks."""
        assert self._wake is not None
        last_check = -math.inf
        while True:
            due = [b.due - self._clock() for b in self._backoff.values()]
            # asyncio.wait, not wait_for: wait_for can swallow a cancellation (Python < 3.12).
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait([waiter], timeout=max(0.05, min([interval, *due])))
            finally:
                waiter.cancel()
            # While this replica lags a rollout, every item it serves on its old default wakes
            # the watcher, and each check lists the whole repository: wakes are coalesced.
            gap = last_check + WAKE_CHECK_GAP_S - time.monotonic()
            if gap > 0:
                await asyncio.sleep(gap)
            self._wake.clear()
            last_check = time.monotonic()
            try:
                await self.check_versions()
            except Exception:  # noqa: BLE001 - keep serving the current version
                logger.exception("checking for new versions of %s failed", self._model)

    async def check_versions(self) -> None:
        """One poll: release quarantines whose files changed, then promote the newest loadable version.

        Only ever steps forward, except away from a version quarantined while default.
        """
        versions = (await asyncio.to_thread(self._repo.refresh)).get(self._model, [])
        await self._release_changed(versions)
        stuck = self._default is not None and self._default in self._quarantine_entries
        candidates = [
            v for v in versions
            if v not in self._quarantine_entries and self._refusal(v, for_item=False) is None
            and (stuck or newer(v, self._default))
        ]  # fmt: skip
        if not candidates:
            return
        newest = candidates[-1]
        async with self._load_lock:
            if newest in self._quarantine_entries or newest == self._default:
                return
            loaded = self._versions.get(newest)
            if loaded is None:  # not loaded by a request meanwhile
                loop = asyncio.get_running_loop()
                # Loaded without its warm-up, which runs paced (beside the batches being served).
                attempt = await loop.run_in_executor(
                    self._loader, self._attempt, newest, lambda: self._load(newest, warm=False)
                )
                if attempt.loaded is not None:
                    cold = attempt.loaded
                    attempt = await asyncio.to_thread(self._attempt, newest, lambda: self._warm(cold))
                loaded = self._settle(attempt)
                if loaded is None:
                    return
                self._versions[newest] = loaded
            self._promote(newest)
            self._evict()

    async def _release_changed(self, versions: list[str]) -> None:
        for version, entry in list(self._quarantine_entries.items()):
            if version not in versions:
                continue  # deleted: nothing to re-check
            fingerprint = await asyncio.to_thread(self._fingerprint, version)
            if fingerprint is None:
                continue
            if entry.fingerprint is None:
                entry.fingerprint = fingerprint
            elif fingerprint != entry.fingerprint:
                del self._quarantine_entries[version]
                self._runtime_faults.pop(version, None)
                self._repo.forget(self._model, version)
                logger.info("files of %s/%s changed: quarantine lifted, loading it again", self._model, version)

    def _runtime_fault(self, version: str, err: EngineFailure) -> None:
        """Count an engine failure against ``version``; quarantine it at :data:`RUNTIME_FAULT_LIMIT`."""
        self._runtime_faults[version] += 1
        count = self._runtime_faults[version]
        if count < RUNTIME_FAULT_LIMIT or version in self._quarantine_entries:
            logger.error(
                "engine fault %d/%d on %s/%s: %s", count, RUNTIME_FAULT_LIMIT, self._model, version, err,
                extra={"model": self._model, "version": version},
            )  # fmt: skip
            return
        self._quarantine(version, err, None, runtime=True)
        if version in self._versions:
            self._unload(version)
        if self._default == version:
            fallback = [v for v in self._versions if v not in self._quarantine_entries]
            if fallback:
                self._promote(max(fallback, key=version_sort_key))
            else:
                self._default = None
                logger.error("no other version of %s is loaded; looking for one", self._model)
        self._wake_watcher()

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
        return VersionInfo(
            self._model, loaded.version, cfg.input, cfg.preprocess, loaded.decode, cfg.batching.max_batch_size
        )

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
        self, items: list[AnyItem], deadline: float | None = None, express: bool = False
    ) -> list[ItemOutcome | Rejection | Retry]:
        """Run every item of one request; one answer per item, in order.

        A bad item is rejected before it joins a batch, so it never fails its neighbours.
        An item's own ``deadline`` (its caller's, in a merged call) replaces the call's.
        ``express`` live items (one-image callers') run ahead, in a batch of their own.
        """
        return list(
            await asyncio.gather(*(self._infer_one(item, item.deadline or deadline, express) for item in items))
        )

    async def _infer_one(
        self, item: AnyItem, deadline: float | None, express: bool = False
    ) -> ItemOutcome | Rejection | Retry:
        if self._fault is not None:
            return Retry(f"model replica unhealthy: {self._fault}")
        try:
            loaded = await self._get(self._serving_version(item), for_item=True)
            if isinstance(item, EncodedItem) and loaded.preparer is None:
                # Sent by an ingress that saw another replica (or version) decode on its GPU.
                item = await asyncio.to_thread(decode_on_cpu, item, loaded.config, self._max_pixels)
            if isinstance(item, BatchItem):
                validate_item(item, loaded.config)
        except PermanentError as err:
            return Rejection(err.reason, err.message)
        except TransientError as err:
            return Retry(str(err))
        key = id(loaded)
        self._users[key] += 1
        try:
            queued = _Queued(dataclasses.replace(item, enqueued_at=time.monotonic()), loaded)
            outcome = await self._queue.submit(queued, deadline, item.priority, express)
            if outcome.retry_message is not None:
                return Retry(outcome.retry_message)
            return outcome
        except Overloaded as err:
            metrics.record_shed(self._model, "model", priority=item.priority)
            return Retry(str(err), overloaded=True, retry_after_s=err.retry_after_s)
        except (DeadlineExceeded, TransientError) as err:
            return Retry(str(err))
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key]
                if key in self._retired:
                    self._close_later(self._retired.pop(key))

    def _serving_version(self, item: AnyItem) -> str:
        """The version that serves ``item`` here: its own, or, while this replica has not yet
        promoted it (another replica did first), this replica's default, when the item's
        caller asked for the default and that version takes the item as prepared."""
        default = self._default
        if default is None or item.version in self._versions or not newer(item.version, default):
            return item.version
        current = self._versions.get(default)
        if current is None:
            return item.version
        if isinstance(item, EncodedItem):
            takes = item.default_ok  # decoded here, by whichever version serves it
        else:
            takes = item.default_prepared_as == preparation_key(current.config.input, current.config.preprocess)
        if not takes:
            return item.version
        self._start_watcher()
        self._wake_watcher()  # the newer version is loaded meanwhile
        return default

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
                results = await asyncio.to_thread(_run_group, loaded, [batch[i].item for i in indices])
            except EngineFailure as err:
                if err.sticky:
                    self._fault = str(err)
                    logger.error("engine fault on %s/%s; replica unhealthy: %s", self._model, loaded.version, err)
                else:
                    self._runtime_fault(loaded.version, err)
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
            "quarantined_versions": self._quarantined,
            "retrying_versions": {v: b.cause for v, b in self._backoff.items()},
            "transient_load_failures": dict(self._load_failures),
            "backends": {v: lv.engine.backend_name for v, lv in self._versions.items()},
            "engine_sources": {v: lv.engine_source for v, lv in self._versions.items()},
            "fallback_reasons": {v: lv.fallback_reason for v, lv in self._versions.items() if lv.fallback_reason},
            "decode": {v: lv.decode for v, lv in self._versions.items()},
            "batch_sizes": {str(k): v for k, v in sorted(self._batch_sizes.items())},
            "queue_depth": self._queue.depth,
            "queue_depth_by_priority": {p.value: self._queue.depth_of(p) for p in Priority},
            "healthy": self._fault is None,
        }

    async def check_health(self) -> None:
        """Serve replaces a replica whose engine faulted (a sticky device error, a wedged provider).

        Serve calls this every ``health_check_period_s`` on the replica's event loop, so it
        also starts the version watcher: a replica that no call reaches (just restarted,
        or behind a router that prefers another) still polls and promotes new versions.
        """
        self._start_watcher()
        if self._fault is None:
            broken = [v for v, lv in self._versions.items() if not engine_healthy(lv.engine)]
            if broken:
                self._fault = f"engine of version(s) {broken} reports a device fault"
        if self._fault is not None:
            raise RuntimeError(f"model {self._model}: {self._fault}")
