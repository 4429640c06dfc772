"""The ingress's work for one call: validate, fetch, decode, infer, record.

Plain asyncio code over a :class:`ModelClient`, so it runs in tests without a
Ray cluster; :mod:`serve.http.ingress` plugs in the Serve deployment handles.

A call's inputs are fetched concurrently on the event loop (async Cloud Storage), decoded
in a thread pool sized to the replica's CPUs, sent to each model deployment in calls that
carry all of that model's items, and recorded with conditional writes
(:mod:`shared.result_store`).

Concurrent live calls share each stage in turn, one input per call at a time, so a
one-image call is not queued behind every image of a larger call that came first: live
reads and writes take a bounded number of slots (:class:`~serve.http.fair_slots.FairSlots`),
decodes a :class:`~serve.http.call_pool.CallPool`, and the calls to a model carry their
items in turn (:mod:`serve.model.coalescer`), one batch per call. A bulk call's inputs
are fetched and written a few at a time, on slots of their own, so live inputs never
queue behind a backfill's; within the bulk class calls go first come first served.

A model version whose replicas decode on their GPU (``VersionInfo.decode`` is not
``cpu``) gets the fetched bytes instead (:class:`~serve.model.batch.EncodedItem`):
nothing is decoded here, and the replica decodes whole batches after its queue
formed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve.engines.errors import is_out_of_memory
from serve.http.call_pool import run_in_turn
from serve.http.fair_slots import FairSlots
from serve.imaging.cpu_decode import PreparedImage, prepare_image
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import AnyItem, BatchItem, EncodedItem, ItemOutcome
from serve.model_config import preparation_key
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError, SupersededError, TransientError
from shared.gcs import GcsClient
from shared.messages import EntryPath, InferenceRequest, Priority
from shared.result_store import RecentWrites, StoredResult, store_result
from shared.results import InferenceResult, ModelRef, SourceRef, Status, Timings
from shared.uris import GcsUri, check_allowed, parse_gcs_uri

#: Per decode thread: bulk inputs one ingress replica fetches and decodes at once, and bulk
#: results it writes at once.
BULK_PREPARES_PER_THREAD = 8
DEFAULT_BULK_PREPARES = BULK_PREPARES_PER_THREAD
#: Per decode thread: live storage requests (reads and writes) one ingress replica has in flight.
LIVE_STORAGE_PER_THREAD = 16
DEFAULT_LIVE_STORAGE = LIVE_STORAGE_PER_THREAD


class ModelClient(Protocol):
    """How the pipeline reaches model deployments."""

    def models(self) -> list[str]: ...

    async def describe(self, model: str, version: str | None) -> VersionInfo: ...

    async def infer_many(
        self, model: str, items: list[AnyItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]: ...


class ShedError(TransientError):
    """A model deployment refused work because its queue is full (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Processed:
    """The pipeline's answer for one input.

    ``superseded`` means a newer generation or model version is already recorded
    for this input (at ``result_uri``); the result computed here was dropped. An
    error result dropped that way is kept at ``error_record_uri`` (see
    :func:`shared.results.superseded_error_object_name`): the response names it so
    that a caller (the functions log it at WARNING) can find it by request id.
    """

    request_id: str
    result: InferenceResult | None
    result_uri: str | None
    superseded: bool = False
    error_record_uri: str | None = None
    # How long storing the result took (its wait for a storage slot included), in milliseconds.
    store_ms: float | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        if self.result is None:
            return {"request_id": self.request_id, "status": "superseded", "result_uri": self.result_uri}
        body = self.result.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["result_uri"] = self.result_uri
        if self.superseded:
            # Computed and returned, but the stored result (a newer generation or version) was kept.
            body["superseded"] = True
        if self.error_record_uri is not None:
            body["error_record_uri"] = self.error_record_uri
        return body


@dataclass(slots=True)
class _Prepared:
    """An input fetched and decoded (or, for a model that decodes on its GPU, only
    fetched: ``image`` None, ``data`` its bytes), waiting for its model."""

    index: int
    request: InferenceRequest
    source: GcsUri | None
    model: str
    info: VersionInfo
    image: PreparedImage | None
    started: float
    fetch_ms: float
    decode_ms: float | None
    data: bytes | None = None
    call: int | None = None  # the ingress call it came with: storage and decode take calls in turn

    def item(self) -> AnyItem:
        priority = self.request.priority
        # A caller that named no version asked for the default: during a rollout, a replica
        # still on the previous default may serve it (see BatchItem.default_prepared_as).
        default = self.request.version is None
        if self.image is None:
            assert self.data is not None
            return EncodedItem(self.data, self.info.version, priority=priority, default_ok=default)
        prepared_as = preparation_key(self.info.input, self.info.preprocess) if default else None
        return BatchItem(
            self.image.pixels, self.image.geometry, self.info.version, priority=priority,
            default_prepared_as=prepared_as,
        )  # fmt: skip

    def drop_image(self) -> None:
        """Let go of the pixels and bytes once the input's answer is settled."""
        self.image = None
        self.data = None


def unwrap(err: BaseException) -> BaseException:
    """Ray re-raises replica exceptions wrapped; the original is ``.cause``."""
    return getattr(err, "cause", None) or err


class InferencePipeline:
    """Turns :class:`InferenceRequest` objects into stored :class:`InferenceResult` objects."""

    def __init__(
        self,
        settings: Settings,
        models: ModelClient,
        gcs: GcsClient,
        decode_executor: Executor,
        prepare: Callable[..., PreparedImage] | None = None,
        bulk_decode_executor: Executor | None = None,
        bulk_prepares: int = DEFAULT_BULK_PREPARES,
        live_storage: int = DEFAULT_LIVE_STORAGE,
    ) -> None:
        if bulk_prepares < 1:
            raise ValueError(f"bulk_prepares must be >= 1, got {bulk_prepares}")
        self._settings = settings
        self._models = models
        self._gcs = gcs
        # Bulk images decode on their own threads (at a lower OS priority in the ingress),
        # so a backfill's decodes never queue in front of a live upload's.
        self._decoders = {
            Priority.LIVE: decode_executor,
            Priority.BULK: bulk_decode_executor or decode_executor,
        }
        # A bulk call's inputs would otherwise all be fetched the moment it is admitted
        # (hundreds in a backfill), each holding a pooled connection and a place in the
        # storage service's queue that a live upload's fetch then waits behind. Bulk inputs
        # are fetched and decoded ``bulk_prepares`` at a time, and their results written as
        # many at a time (a finished batch would write all of its results at once); live
        # inputs never wait for a slot.
        self._bulk_slots = asyncio.Semaphore(bulk_prepares)
        self._bulk_writes = asyncio.Semaphore(bulk_prepares)
        # Live reads and writes: at most ``live_storage`` at once, slots going to the
        # waiting calls in turn, so a one-image call's read and write do not queue at the
        # storage service behind every input of the calls admitted before it.
        self._live_storage = FairSlots(live_storage)
        # prepare_image, or a stand-in with its contract (tests).
        self._prepare_image = prepare or prepare_image
        # Redeliveries and repeated images rewrite a result in one request.
        self._recent = RecentWrites()

    async def process_many(
        self,
        requests: Sequence[InferenceRequest],
        deadline: float | None = None,
        settled: Callable[[int], None] | None = None,
    ) -> list[Processed | BaseException]:
        """Run every request; one answer per request, a transient failure as its exception.

        ``settled(i)`` is called as soon as request ``i``'s answer is known (the ingress
        gives back that input's admission hold then, not when the whole call ends).
        """
        answers: list[Processed | BaseException | None] = [None] * len(requests)
        prepared: list[_Prepared] = []
        call = random.getrandbits(62)
        done = settled or (lambda _: None)

        async def prepare(i: int, request: InferenceRequest) -> None:
            try:
                outcome = await self._prepare(i, request, call)
            except BaseException as err:  # noqa: BLE001 - kept per input, mapped by the caller
                answers[i] = err
                done(i)
                return
            if isinstance(outcome, _Prepared):
                prepared.append(outcome)
            else:
                answers[i] = outcome
                done(i)

        await asyncio.gather(*(prepare(i, r) for i, r in enumerate(requests)))
        by_model: dict[str, list[_Prepared]] = {}
        for p in sorted(prepared, key=lambda p: p.index):
            by_model.setdefault(p.model, []).append(p)
        stored = await asyncio.gather(
            *(self._infer_and_store(model, group, deadline, done) for model, group in by_model.items())
        )
        for group_answers in stored:
            for index, answer in group_answers:
                answers[index] = answer
        return [a if a is not None else RuntimeError("input was not processed") for a in answers]

    async def process_bytes(
        self,
        data: bytes,
        model: str | None,
        version: str | None,
        request_id: str,
        deadline: float | None = None,
        priority: Priority = Priority.LIVE,
    ) -> Processed:
        """Run an image posted in the HTTP body; recorded under a name derived from its content."""
        started = time.monotonic()
        digest = hashlib.sha256(data).hexdigest()
        request = InferenceRequest(
            uri=f"sha256:{digest}", model=model, version=version,
            request_id=request_id, entry_path=EntryPath.HTTP, priority=priority,
        )  # fmt: skip
        source = GcsUri(self._settings.results_bucket, f"_http/{digest}")
        model = model or self._settings.default_model
        call = random.getrandbits(62)
        try:
            if len(data) > self._settings.max_image_bytes:
                raise PermanentError(
                    ErrorReason.IMAGE_TOO_LARGE, f"body is {len(data)} bytes, limit {self._settings.max_image_bytes}"
                )
            info = await self._describe(model, version)
            p = await self._decode_one(0, request, source, model, info, data, started, 0.0, call)
        except PermanentError as err:
            return await self._record_failure(request, model, version, err, source, call)
        [(_, answer)] = await self._infer_and_store(model, [p], deadline)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _live_turn(self, priority: Priority, call: int | None) -> contextlib.AbstractAsyncContextManager[Any]:
        """A live storage request's slot, in its call's turn (bulk has slots of its own)."""
        return self._live_storage.turn(call) if priority is Priority.LIVE else contextlib.nullcontext()

    # -- steps -----------------------------------------------------------------------------
    async def _prepare(self, index: int, request: InferenceRequest, call: int) -> _Prepared | Processed:
        started = time.monotonic()
        model = request.model or self._settings.default_model
        source: GcsUri | None = None
        # Until the model deployment has resolved the version, an error record names
        # none: a bogus requested version must not outrank a stored result.
        version: str | None = None
        try:
            source = parse_gcs_uri(request.uri)
            check_allowed(source, self._settings.allowed_buckets)
            info = await self._describe(model, request.version)
            version = info.version
            async with _bulk_only(self._bulk_slots, request.priority):
                t_fetch = time.monotonic()
                async with self._live_turn(request.priority, call):
                    data, generation = await self._gcs.read(
                        source, request.generation, self._settings.max_image_bytes
                    )
                request = request.model_copy(update={"generation": generation or request.generation})
                fetch_ms = (time.monotonic() - t_fetch) * 1000
                return await self._decode_one(index, request, source, model, info, data, started, fetch_ms, call)
        except SupersededError:
            return Processed(request.request_id, None, None, superseded=True)
        except PermanentError as err:
            if err.reason is ErrorReason.OBJECT_MISSING:
                # A generation no read confirmed (a deleted one, or one that never
                # existed) must not rank the error above later uploads' results.
                request = request.model_copy(update={"generation": None})
            return await self._record_failure(request, model, version, err, source, call)

    async def _decode_one(
        self, index: int, request: InferenceRequest, source: GcsUri | None, model: str,
        info: VersionInfo, data: bytes, started: float, fetch_ms: float, call: int,
    ) -> _Prepared:  # fmt: skip
        if info.decode != "cpu":  # the model's replicas decode whole batches on their GPU
            return _Prepared(index, request, source, model, info, None, started, fetch_ms, None, data, call)
        t_decode = time.monotonic()
        try:
            image = await run_in_turn(
                self._decoders[request.priority], call, self._prepare_image,
                data, info.input, info.preprocess, self._settings.max_image_pixels,
            )  # fmt: skip
        except (PermanentError, TransientError):
            raise
        except Exception as err:  # noqa: BLE001 - pinned on this one input's bytes
            if is_out_of_memory(err):  # the machine's state, not the image's bytes
                raise TransientError(f"out of memory decoding an image: {err!r}"[:500]) from err
            # Decoders raise far more than they document (SyntaxError on broken PNG
            # chunks, struct errors in EXIF blocks): any of it condemns only this image.
            raise PermanentError(ErrorReason.NOT_AN_IMAGE, f"cannot decode image: {err!r}"[:500]) from err
        decode_ms = (time.monotonic() - t_decode) * 1000
        return _Prepared(index, request, source, model, info, image, started, fetch_ms, decode_ms, call=call)

    async def _describe(self, model: str, version: str | None) -> VersionInfo:
        if model not in self._models.models():
            raise PermanentError(
                ErrorReason.UNKNOWN_MODEL,
                f"model {model!r} is not served (models: {sorted(self._models.models())})",
            )
        return await self._models.describe(model, version)

    async def _infer_and_store(
        self, model: str, group: list[_Prepared], deadline: float | None,
        settled: Callable[[int], None] = lambda _: None,
    ) -> list[tuple[int, Processed | BaseException]]:  # fmt: skip
        items = [p.item() for p in group]
        try:
            outcomes = await self._models.infer_many(model, items, deadline)
        except BaseException as err:  # noqa: BLE001 - the whole call failed: every item retries
            for p in group:
                settled(p.index)
            return [(p.index, err) for p in group]
        del items

        async def finish(p: _Prepared, outcome: ItemOutcome | Rejection | Retry) -> Processed | BaseException:
            try:
                return await answer(p, outcome)
            finally:
                p.drop_image()
                settled(p.index)

        async def answer(p: _Prepared, outcome: ItemOutcome | Rejection | Retry) -> Processed | BaseException:
            try:
                if isinstance(outcome, Retry):
                    if outcome.overloaded:
                        return ShedError(outcome.message, outcome.retry_after_s)
                    return TransientError(outcome.message)
                if isinstance(outcome, Rejection):
                    # A version another replica resolved and this one refuses says nothing
                    # about the input: recorded without a version, it never outranks a result.
                    unresolved = outcome.reason in (ErrorReason.UNKNOWN_VERSION, ErrorReason.UNKNOWN_MODEL)
                    return await self._record_failure(
                        p.request, model, None if unresolved else p.info.version, outcome.to_error(), p.source,
                        p.call,
                    )  # fmt: skip
                return await self._store(_result(p, outcome), p.source, p.request.priority, p.call)
            except BaseException as err:  # noqa: BLE001 - kept per input
                return err

        answers = await asyncio.gather(*(finish(p, o) for p, o in zip(group, outcomes, strict=True)))
        return [(p.index, a) for p, a in zip(group, answers, strict=True)]

    async def _record_failure(
        self, request: InferenceRequest, model: str, version: str | None, err: PermanentError,
        source: GcsUri | None, call: int | None,
    ) -> Processed:  # fmt: skip
        result = InferenceResult.failure(request, err.reason, err.message, model=model, version=version)
        return await self._store(result, source, request.priority, call)

    async def _store(
        self, result: InferenceResult, source: GcsUri | None, priority: Priority, call: int | None
    ) -> Processed:
        asked = time.monotonic()
        async with _bulk_only(self._bulk_writes, priority), self._live_turn(priority, call):
            stored: StoredResult = await store_result(
                self._gcs, self._settings.results_bucket, result, source, self._recent
            )
        return Processed(
            result.request_id, result, stored.uri, superseded=stored.superseded,
            error_record_uri=stored.error_record_uri, store_ms=round((time.monotonic() - asked) * 1000, 1),
        )  # fmt: skip


def _bulk_only(slots: asyncio.Semaphore, priority: Priority) -> contextlib.AbstractAsyncContextManager[Any]:
    """One of ``slots`` for bulk work; nothing to wait for on live work."""
    return slots if priority is Priority.BULK else contextlib.nullcontext()


def _result(p: _Prepared, outcome: ItemOutcome) -> InferenceResult:
    request = p.request
    decode_ms = outcome.decode_ms if outcome.decode_ms is not None else p.decode_ms
    timings = Timings(
        fetch_ms=round(p.fetch_ms, 3),
        decode_ms=None if decode_ms is None else round(decode_ms, 3),
        queue_wait_ms=outcome.queue_wait_ms,
        inference_ms=outcome.inference_ms,
        batch_size=outcome.batch_size,
        end_to_end_ms=round((time.monotonic() - p.started) * 1000, 3),
    )
    if outcome.error_reason is not None:
        failed = InferenceResult.failure(
            request, outcome.error_reason, outcome.error_message or "", model=p.model, version=outcome.version
        )
        return failed.model_copy(
            update={
                "backend": outcome.backend, "decode": outcome.decode, "engine_source": outcome.engine_source,
                "timings": timings,
            }
        )  # fmt: skip
    return InferenceResult(
        source=SourceRef(uri=request.uri, generation=request.generation),
        model=ModelRef(name=p.model, version=outcome.version),
        status=Status.OK,
        backend=outcome.backend,
        decode=outcome.decode,
        engine_source=outcome.engine_source,
        labels=outcome.labels,
        detections=outcome.detections,
        timings=timings,
        request_id=request.request_id,
        entry_path=request.entry_path,
    )
