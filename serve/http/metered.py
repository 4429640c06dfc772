"""The ingress's pipeline with every answer recorded in :mod:`serve.metrics`."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence

from serve import metrics
from serve.http.pipeline import InferencePipeline, Processed, ShedError, unwrap
from shared.errors import PermanentError
from shared.messages import EntryPath, InferenceRequest, Priority

TRANSIENT = "transient"
OVERLOADED = "overloaded"


class MeteredPipeline:
    """Wraps :class:`~serve.http.pipeline.InferencePipeline`: same calls, same answers, plus metrics.

    Every input of a call is counted once, with the call's duration: the caller
    gets all of a call's answers together. Label values come from what is served
    (``served`` models, resolved versions), never from what a caller typed.
    """

    def __init__(
        self, pipeline: InferencePipeline, default_model: str, served: Collection[str]
    ) -> None:
        self._pipeline = pipeline
        self._default_model = default_model
        self._served = frozenset(served)

    async def process_many(
        self,
        requests: Sequence[InferenceRequest],
        deadline: float | None = None,
        settled: Callable[[int], None] | None = None,
    ) -> list[Processed | BaseException]:
        started = time.monotonic()
        answers = await self._pipeline.process_many(requests, deadline, settled)
        elapsed = time.monotonic() - started
        for request, answer in zip(requests, answers, strict=True):
            self._record(
                request.model, request.entry_path.value, answer, elapsed, request.priority.value
            )
        return answers

    async def process_bytes(
        self,
        data: bytes,
        model: str | None,
        version: str | None,
        request_id: str,
        deadline: float | None = None,
        priority: Priority = Priority.LIVE,
    ) -> Processed:
        started = time.monotonic()
        try:
            answer = await self._pipeline.process_bytes(
                data, model, version, request_id, deadline, priority
            )
        except Exception as err:
            self._record(
                model, EntryPath.HTTP.value, err, time.monotonic() - started, priority.value
            )
            raise
        self._record(
            model, EntryPath.HTTP.value, answer, time.monotonic() - started, priority.value
        )
        return answer

    def _record(
        self, model: str | None, entry_path: str, answer: Processed | BaseException, seconds: float,
        priority: str = "live",
    ) -> None:  # fmt: skip
        cause = unwrap(answer) if isinstance(answer, BaseException) else answer
        model = model or self._default_model
        if model not in self._served:
            model = metrics.UNATTRIBUTED
        if isinstance(cause, Processed) and cause.result is not None:
            metrics.record_result(cause.result, seconds, model, priority)
            return
        # No stored result: the version was never resolved by the model deployment.
        if isinstance(cause, Processed):  # superseded before anything was computed
            metrics.record_answer(model, None, entry_path, seconds, priority=priority)
        elif isinstance(cause, PermanentError):
            metrics.record_answer(model, None, entry_path, seconds, cause.reason.value, priority)
        else:
            reason = OVERLOADED if isinstance(cause, ShedError) else TRANSIENT
            metrics.record_answer(model, None, entry_path, seconds, reason, priority)
