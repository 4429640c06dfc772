"""The ingress's calls to the model deployments over Serve deployment handles.

What the ingress must learn from a model before it can forward (the default version
and its input spec, an OIP signature) comes from a model replica. With scale to zero
the model may have none: a call to its handle then waits while Serve starts one.
Such a look-up is made once per (model, version) however many callers want it (one
*flight*), and it keeps going in the background for up to :data:`COLD_START_LIMIT_S`,
so the queued call keeps asking Serve for a replica. Each caller waits for it only
as long as its own budget (:func:`waiting_for_model`): the call's work deadline, or a
short grace for HTTP callers who did not ask to wait. A caller whose budget runs out
gets :class:`ModelStarting`, which the routes answer with 503 and ``Retry-After``
(Pub/Sub redelivers), never a timeout or a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from ray.serve.handle import DeploymentHandle

from serve.http.deadline import HANDLE_GRACE_S
from serve.http.pipeline import unwrap
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import AnyItem, EncodedItem, ItemOutcome
from serve.model.coalescer import CallCoalescer
from shared.errors import TransientError
from shared.messages import Priority

logger = logging.getLogger(__name__)

# Answers for "the default version" may change when a version is promoted; this
# long at most an ingress keeps preprocessing for the previous default.
DEFAULT_VERSION_TTL_S = 2.0
# A look-up that waits for a model replica keeps going this long in the background
# (a GPU node's provisioning, image pull and engine download), whoever still waits.
COLD_START_LIMIT_S = 600.0
# Callers that do not wait for a cold model are told to come back after this long.
COLD_START_RETRY_AFTER_S = 30
# Deployment-handle calls without a caller's deadline fail after this long (and the input retries).
HANDLE_TIMEOUT_S = 120.0
# Calls per model and traffic class in flight from one ingress replica; concurrent requests beyond
# this are merged into the next call (serve/model/coalescer.py).
MAX_CALLS_IN_FLIGHT = 2
# One Ingress -> model call carries at most this many bytes of tensors, far below
# gRPC's 256 MiB message limit between deployments (serve_host.GRPC_MAX_MESSAGE_BYTES)
# whatever the model's input size; larger merged calls are split.
MAX_CALL_BYTES = 64 * 1024 * 1024
# ... and at most this many items. A live call carries at most one batch of the model's
# (its default version's max_batch_size, once described): a call is answered when its
# last item is, so a call of many batches would hold every answer merged into it (and
# the next callers' items, waiting for a call slot) until the model had worked through
# all of them, and its pickled tensors would sit in both processes meanwhile. Bulk calls
# stay large: a backfill waits for nobody's answer in particular, and fewer calls leave
# the ingress's event loop to live work.
MAX_CALL_ITEMS = 256
# Per item beyond its pixels: geometry, version, pickling.
ITEM_OVERHEAD_BYTES = 512

_wait_until: contextvars.ContextVar[float | None] = contextvars.ContextVar("model_wait_until", default=None)

K = TypeVar("K")
V = TypeVar("V")


class ModelStarting(TransientError):
    """The model has no replica ready yet (scaled to zero, or starting): retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = COLD_START_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@contextlib.contextmanager
def waiting_for_model(until: float | None) -> Iterator[None]:
    """Within this block (and the tasks it starts), model look-ups wait until ``until`` (epoch seconds)."""
    token = _wait_until.set(until)
    try:
        yield
    finally:
        _wait_until.reset(token)


class SingleFlight(Generic[K, V]):
    """One look-up per key at a time, shared by every caller, each waiting within its own budget."""

    def __init__(self, limit_s: float = COLD_START_LIMIT_S) -> None:
        self._flights: dict[K, asyncio.Task[V]] = {}
        self._limit_s = limit_s

    async def get(self, key: K, fetch: Callable[[], Awaitable[V]], what: str) -> V:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.get_running_loop().create_task(asyncio.wait_for(fetch(), self._limit_s))
            self._flights[key] = flight
            flight.add_done_callback(lambda done, key=key: self._forget(key, done))
        until = _wait_until.get()
        budget = HANDLE_TIMEOUT_S if until is None else until - time.time()
        try:
            return await asyncio.wait_for(asyncio.shield(flight), max(0.0, budget))
        except TimeoutError as err:
            if flight.done() and not flight.cancelled():
                if flight.exception() is None:
                    return flight.result()  # answered just as the budget ran out
                raise ModelStarting(f"{what}: no replica answered within {self._limit_s:.0f} s") from err
            raise ModelStarting(f"{what}: no replica ready yet (the model may be scaling up from zero)") from err

    def _forget(self, key: K, done: asyncio.Task[V]) -> None:
        if self._flights.get(key) is done:
            del self._flights[key]
        if not done.cancelled() and done.exception() is not None:
            done.exception()  # retrieved: a failed background look-up is not an unhandled error


def _item_bytes(item: AnyItem) -> int:
    size = len(item.data) if isinstance(item, EncodedItem) else item.pixels.nbytes
    return int(size) + ITEM_OVERHEAD_BYTES


def _with_deadline(item: AnyItem, deadline: float) -> AnyItem:
    """``item`` carrying its caller's deadline, so that the model drops it at that one."""
    return dataclasses.replace(item, deadline=deadline)


class HandleModelClient:
    """:class:`serve.http.pipeline.ModelClient` over Serve deployment handles.

    A published version's input spec never changes, so ``describe`` answers for
    an explicit version are kept; the default version is asked again after
    :data:`DEFAULT_VERSION_TTL_S`.
    """

    def __init__(self, handles: Mapping[str, DeploymentHandle], clock=time.monotonic) -> None:  # noqa: ANN001
        self._handles = handles
        self._described: dict[tuple[str, str], VersionInfo] = {}
        self._defaults: dict[str, tuple[float, VersionInfo]] = {}
        self._coalescers: dict[
            tuple[str, Priority], CallCoalescer[AnyItem, ItemOutcome | Rejection | Retry]
        ] = {}
        self._lookups: SingleFlight[tuple[str, str, str | None], Any] = SingleFlight()
        self._clock = clock
        # Items per merged live call, per model: one batch of its default version.
        self._live_call_items: dict[str, int] = {}

    def models(self) -> list[str]:
        return list(self._handles)

    async def lookup(self, method: str, model: str, version: str | None) -> Any:
        """``handle.<method>.remote(version)`` shared by concurrent callers, within each one's budget."""
        answer = await self._lookups.get(
            (method, model, version),
            lambda: getattr(self._handles[model], method).remote(version),
            f"model {model}",
        )
        if isinstance(answer, Rejection):
            raise answer.to_error()
        if isinstance(answer, Retry):
            raise TransientError(answer.message)
        return answer

    async def describe(self, model: str, version: str | None) -> VersionInfo:
        if version is not None and (model, version) in self._described:
            return self._described[(model, version)]
        if version is None and model in self._defaults:
            at, info = self._defaults[model]
            if self._clock() - at < DEFAULT_VERSION_TTL_S:
                return info
        answer: VersionInfo = await self.lookup("describe", model, version)
        self._described[(model, answer.version)] = answer
        if version is None:
            self._defaults[model] = (self._clock(), answer)
            if answer.max_batch_size:
                self._live_call_items[model] = min(answer.max_batch_size, MAX_CALL_ITEMS)
                live = self._coalescers.get((model, Priority.LIVE))
                if live is not None:
                    live.max_items = self._live_call_items[model]
        return answer

    async def infer_many(
        self, model: str, items: list[AnyItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]:
        """Each item's answer; live and bulk items travel in calls of their own class.

        Every class has its own merged calls in flight, so a live item never waits for a
        call slot behind bulk calls of hundreds of items (the model's queue then serves
        the live items first).
        """
        classes = {item.priority for item in items}
        if len(classes) == 1:
            return await self._coalescer(model, classes.pop()).call(items, deadline)
        answers: list[ItemOutcome | Rejection | Retry | None] = [None] * len(items)

        async def run(priority: Priority) -> None:
            indices = [i for i, item in enumerate(items) if item.priority is priority]
            got = await self._coalescer(model, priority).call([items[i] for i in indices], deadline)
            for i, answer in zip(indices, got, strict=True):
                answers[i] = answer

        await asyncio.gather(*(run(p) for p in sorted(classes)))
        return [a for a in answers if a is not None]

    def _coalescer(
        self, model: str, priority: Priority
    ) -> CallCoalescer[AnyItem, ItemOutcome | Rejection | Retry]:
        key = (model, priority)
        if key not in self._coalescers:
            self._coalescers[key] = CallCoalescer(
                lambda merged, latest, model=model: self._send(model, merged, latest),
                MAX_CALLS_IN_FLIGHT,
                max_items=self._live_call_items.get(model, MAX_CALL_ITEMS) if priority is Priority.LIVE else MAX_CALL_ITEMS,
                max_bytes=MAX_CALL_BYTES,
                size_of=_item_bytes,
                on_error=_retry_for,
                stamp=_with_deadline,
                # Live callers wait on their own answers: their items go in turn. A backfill's
                # calls go whole, one after another, so each finishes (and frees its hold) sooner.
                in_turn=priority is Priority.LIVE,
                # While a batch's worth of merged live items is in flight or waiting, a
                # one-image caller's item goes at once in a call of its own, and the model
                # runs it ahead of the merged items.
                express=(
                    (lambda merged, latest, model=model: self._send(model, merged, latest, express=True))
                    if priority is Priority.LIVE
                    else None
                ),
            )
        return self._coalescers[key]

    async def _send(
        self, model: str, items: list[AnyItem], deadline: float | None, express: bool = False
    ) -> list[ItemOutcome | Rejection | Retry]:
        # The model drops queued items at the deadline; its answer may take a moment more.
        timeout = HANDLE_TIMEOUT_S if deadline is None else max(0.1, deadline - time.time() + HANDLE_GRACE_S)
        return await asyncio.wait_for(self._handles[model].infer_many.remote(items, deadline, express), timeout)

    async def stats(self) -> dict[str, Any]:
        return {m: await h.stats.remote() for m, h in self._handles.items()}


def _retry_for(err: Exception) -> Retry:
    """The answer for each item of a model call that failed as a whole: retry that item."""
    cause = unwrap(err)
    if isinstance(cause, TimeoutError):
        return Retry("the model did not answer before the deadline")
    return Retry(f"model call failed: {cause!r}"[:500])


__all__ = [
    "COLD_START_RETRY_AFTER_S",
    "DEFAULT_VERSION_TTL_S",
    "HandleModelClient",
    "MAX_CALL_BYTES",
    "ModelStarting",
    "SingleFlight",
    "waiting_for_model",
]
