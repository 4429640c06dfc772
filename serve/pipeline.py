"""The ingress's work for one input: validate, fetch, decode, infer, record.

Plain asyncio code over a :class:`ModelClient`, so it runs in tests without a
Ray cluster; :mod:`serve.ingress` plugs in the Serve deployment handles.
Blocking steps (GCS reads and writes, JPEG decoding) run in a thread pool so the
event loop keeps admitting requests while images decode.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from serve.batch import BatchItem, ItemOutcome
from serve.imaging import prepare_image
from serve.model_server import VersionInfo
from shared.config import Settings
from shared.errors import ErrorReason, PermanentError, SupersededError
from shared.messages import EntryPath, InferenceRequest
from shared.result_store import store_result
from shared.results import InferenceResult, ModelRef, SourceRef, Status, Timings
from shared.storage import read_object
from shared.uris import GcsUri, check_allowed, parse_gcs_uri

T = TypeVar("T")


class ModelClient(Protocol):
    """How the pipeline reaches model deployments."""

    def models(self) -> list[str]: ...

    async def describe(self, model: str, version: str | None) -> VersionInfo: ...

    async def infer(self, model: str, item: BatchItem) -> ItemOutcome: ...


@dataclass(frozen=True, slots=True)
class Processed:
    """The pipeline's answer for one input; ``result`` is ``None`` when superseded."""

    request_id: str
    result: InferenceResult | None
    result_uri: str | None

    def to_dict(self) -> dict[str, Any]:
        if self.result is None:
            return {"request_id": self.request_id, "status": "superseded", "result_uri": None}
        body = self.result.model_dump(mode="json", by_alias=True, exclude_none=True)
        body["result_uri"] = self.result_uri
        return body


def unwrap(err: BaseException) -> BaseException:
    """Ray re-raises replica exceptions wrapped; the original is ``.cause``."""
    return getattr(err, "cause", None) or err


class InferencePipeline:
    """Turns one :class:`InferenceRequest` into a stored :class:`InferenceResult`."""

    def __init__(
        self,
        settings: Settings,
        models: ModelClient,
        executor: Executor,
        decode_executor: Executor | None = None,
    ) -> None:
        self._settings = settings
        self._models = models
        # GCS calls wait on the network and want many threads; decoding wants about
        # one thread per core. Separate pools keep one from starving the other.
        self._executor = executor
        self._decode_executor = decode_executor or executor

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _compute(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._decode_executor, fn, *args)

    async def process(self, request: InferenceRequest) -> Processed:
        """Run ``request`` end to end; permanent problems become error results."""
        started = time.monotonic()
        model = request.model or self._settings.default_model
        source: GcsUri | None = None
        version: str | None = request.version
        try:
            source = parse_gcs_uri(request.uri)
            check_allowed(source, self._settings.allowed_buckets)
            info = await self._describe(model, request.version)
            version = info.version
            t_fetch = time.monotonic()
            data, generation = await self._blocking(
                read_object, source, request.generation, self._settings.max_image_bytes
            )
            request = request.model_copy(update={"generation": generation})
            fetch_ms = (time.monotonic() - t_fetch) * 1000
            result = await self._run(request, model, info, data, started, fetch_ms)
        except SupersededError:
            return Processed(request.request_id, None, None)
        except PermanentError as err:
            cause = unwrap(err)
            assert isinstance(cause, PermanentError)
            result = InferenceResult.failure(
                request, cause.reason, cause.message, model=model, version=version
            )
        uri = await self._blocking(store_result, self._settings.results_bucket, result, source)
        return Processed(request.request_id, result if uri else None, uri)

    async def process_bytes(
        self, data: bytes, model: str | None, version: str | None, request_id: str
    ) -> Processed:
        """Run an image posted in the HTTP body; stored under a name derived from its content."""
        started = time.monotonic()
        model = model or self._settings.default_model
        digest = hashlib.sha256(data).hexdigest()
        request = InferenceRequest(
            uri=f"sha256:{digest}",
            model=model,
            version=version,
            request_id=request_id,
            entry_path=EntryPath.HTTP,
        )
        if len(data) > self._settings.max_image_bytes:
            raise PermanentError(
                ErrorReason.IMAGE_TOO_LARGE,
                f"body is {len(data)} bytes, limit {self._settings.max_image_bytes}",
            )
        info = await self._describe(model, version)
        result = await self._run(request, model, info, data, started, 0.0)
        source = GcsUri(self._settings.results_bucket, f"_http/{digest}")
        uri = await self._blocking(store_result, self._settings.results_bucket, result, source)
        return Processed(request.request_id, result, uri)

    async def _describe(self, model: str, version: str | None) -> VersionInfo:
        if model not in self._models.models():
            raise PermanentError(
                ErrorReason.UNKNOWN_MODEL,
                f"model {model!r} is not served (models: {sorted(self._models.models())})",
            )
        return await self._models.describe(model, version)

    async def _run(
        self,
        request: InferenceRequest,
        model: str,
        info: VersionInfo,
        data: bytes,
        started: float,
        fetch_ms: float,
    ) -> InferenceResult:
        t_decode = time.monotonic()
        prepared = await self._compute(
            prepare_image, data, info.input, info.preprocess, self._settings.max_image_pixels
        )
        decode_ms = (time.monotonic() - t_decode) * 1000
        outcome = await self._models.infer(
            model, BatchItem(prepared.pixels, prepared.geometry, info.version)
        )
        timings = Timings(
            fetch_ms=round(fetch_ms, 3),
            decode_ms=round(decode_ms, 3),
            queue_wait_ms=outcome.queue_wait_ms,
            inference_ms=outcome.inference_ms,
            batch_size=outcome.batch_size,
            end_to_end_ms=round((time.monotonic() - started) * 1000, 3),
        )
        if outcome.error_reason is not None:
            result = InferenceResult.failure(
                request, outcome.error_reason, outcome.error_message or "", model=model, version=outcome.version
            )
            return result.model_copy(update={"backend": outcome.backend, "timings": timings})
        return InferenceResult(
            source=SourceRef(uri=request.uri, generation=request.generation),
            model=ModelRef(name=model, version=outcome.version),
            status=Status.OK,
            backend=outcome.backend,
            labels=outcome.labels,
            detections=outcome.detections,
            timings=timings,
            request_id=request.request_id,
            entry_path=request.entry_path,
        )
