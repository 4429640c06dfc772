"""The HTTP ingress deployment: ``POST /v1/infer`` and health/introspection routes.

Used by the Cloud Functions (normalized requests) and directly by clients
(``{"uris": [...]}`` or a raw image body). Status codes tell callers whether to
retry: 200 when every input has a stored result (``ok`` or ``error``), 400 for
a body that is not a request at all, 503 when something transient failed.
"""

# No `from __future__ import annotations`: FastAPI resolves the route
# signatures of this class at runtime and would miss `Request`.
import asyncio
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.batch import BatchItem, ItemOutcome
from serve.model_server import Rejection, VersionInfo
from serve.pipeline import InferencePipeline, Processed, unwrap
from shared.config import load_settings
from shared.errors import PermanentError
from shared.logging import configure_json_logging
from shared.messages import EntryPath, InferenceRequest, RequestMessage

logger = logging.getLogger(__name__)
api = FastAPI(title="triggerfish", version="1")
MAX_REQUESTS_PER_CALL = 100


class HandleModelClient:
    """:class:`serve.pipeline.ModelClient` over Serve deployment handles.

    ``describe`` answers for an explicit version are cached: a published version's
    input spec never changes. Requests without a version always ask, so a promoted
    version takes traffic as soon as the model deployment switches to it.
    """

    def __init__(self, handles: dict[str, DeploymentHandle]) -> None:
        self._handles = handles
        self._described: dict[tuple[str, str], VersionInfo] = {}

    def models(self) -> list[str]:
        return list(self._handles)

    async def describe(self, model: str, version: str | None) -> VersionInfo:
        if version is not None and (model, version) in self._described:
            return self._described[(model, version)]
        answer = await self._handles[model].describe.remote(version)
        if isinstance(answer, Rejection):
            raise answer.to_error()
        if version is not None:
            self._described[(model, version)] = answer
        return answer

    async def infer(self, model: str, item: BatchItem) -> ItemOutcome:
        answer = await self._handles[model].infer.remote(item)
        if isinstance(answer, Rejection):
            raise answer.to_error()
        return answer

    async def stats(self) -> dict[str, Any]:
        return {m: await h.stats.remote() for m, h in self._handles.items()}


def parse_infer_body(body: Any) -> list[InferenceRequest]:
    """Accept ``{"requests": [InferenceRequest...]}`` (functions) or a request message (clients)."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    if "requests" in body:
        items = body["requests"]
        if not isinstance(items, list) or not items or len(items) > MAX_REQUESTS_PER_CALL:
            raise ValueError(f"'requests' must be a list of 1..{MAX_REQUESTS_PER_CALL} requests")
        return [InferenceRequest.model_validate(r) for r in items]
    message = RequestMessage.model_validate(body)
    return message.to_requests(f"http-{uuid.uuid4().hex}", EntryPath.HTTP)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Routes HTTP calls to the per-model deployments."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        configure_json_logging()
        self._client = HandleModelClient(models)
        decoders = int(os.environ.get("TRIGGERFISH_DECODE_THREADS", "0")) or (os.cpu_count() or 2)
        io_threads = int(os.environ.get("TRIGGERFISH_IO_THREADS", "0")) or 32
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="gcs")
        self._decode = ThreadPoolExecutor(max_workers=decoders, thread_name_prefix="decode")
        self._pipeline = InferencePipeline(load_settings(), self._client, self._io, self._decode)

    @api.post("/v1/infer")
    async def infer(self, request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        raw = await request.body()
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await self._infer_bytes(raw, request)
        try:
            body = await request.json()
            requests = parse_infer_body(body)
        except (ValueError, ValidationError) as err:
            return JSONResponse({"error": "bad_request", "message": str(err)}, status_code=400)
        outcomes = await asyncio.gather(
            *(self._pipeline.process(r) for r in requests), return_exceptions=True
        )
        return self._respond(list(outcomes))

    async def _infer_bytes(self, raw: bytes, request: Request) -> JSONResponse:
        if not raw:
            return JSONResponse({"error": "bad_request", "message": "empty body"}, status_code=400)
        params = request.query_params
        try:
            outcome: Processed | BaseException = await self._pipeline.process_bytes(
                raw, params.get("model"), params.get("version"), f"http-{uuid.uuid4().hex}"
            )
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            outcome = err
        return self._respond([outcome])

    def _respond(self, outcomes: list[Processed | BaseException]) -> JSONResponse:
        results: list[dict[str, Any]] = []
        transient = []
        for outcome in outcomes:
            cause = unwrap(outcome) if isinstance(outcome, BaseException) else outcome
            if isinstance(cause, Processed):
                results.append(cause.to_dict())
            elif isinstance(cause, PermanentError):
                results.append({"status": "error", "error": {"reason": cause.reason, "message": cause.message}})
            else:
                logger.error("transient failure: %r", cause, exc_info=cause)
                transient.append(repr(cause))
                results.append({"status": "retry", "error": {"message": repr(cause)}})
        if transient:
            return JSONResponse(
                {"error": "transient", "message": transient[0], "results": results},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        return JSONResponse({"results": results})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Ready when every model deployment answers (each has loaded and warmed up an engine)."""
        try:
            stats = await asyncio.wait_for(self._client.stats(), timeout=10)
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "unavailable", "message": repr(err)}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(stats)})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(await self._client.stats())

    @api.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        return JSONResponse(await self._client.stats())


__all__ = ["Ingress", "parse_infer_body"]
