"""The HTTP ingress deployment: ``POST /v1/infer`` and health/introspection routes.

Used by the Cloud Functions (normalized requests) and directly by clients
(``{"uris": [...]}`` or a raw image body). Status codes tell callers whether to
retry: 200 when every input has a stored result (``ok`` or ``error``), 400 for
a body that is not a request at all, 429 with ``Retry-After`` when the service
sheds load, 503 when something transient failed.

The Open Inference Protocol (KServe v2) routes under ``/v2`` delegate to
:mod:`serve.http.oip_service`.
"""

# No `from __future__ import annotations`: FastAPI resolves the route
# signatures of this class at runtime and would miss `Request`.
import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve import metrics
from serve.cpus import replica_cpus
from serve.http.metered import MeteredPipeline
from serve.http.oip_service import HandleOipClient, InferCall, OipService
from serve.http.pipeline import InferencePipeline, Processed, ShedError, unwrap
from serve.model.batch import BatchItem, ItemOutcome
from serve.model.coalescer import CallCoalescer
from serve.model.model_server import Rejection, Retry, VersionInfo
from shared.auth import AuthConfig, AuthError, TokenVerifier
from shared.config import load_settings
from shared.errors import ConfigError, PermanentError, TransientError
from shared.gcs import GcsClient
from shared.logging import configure_json_logging
from shared.messages import (
    DEADLINE_HEADER,
    EntryPath,
    InferenceRequest,
    RequestMessage,
    parse_json_bounded,
)

logger = logging.getLogger(__name__)
api = FastAPI(title="triggerfish", version="1")
MAX_REQUESTS_PER_CALL = 100
# Answers for "the default version" may change when a version is promoted; this
# long at most an ingress keeps preprocessing for the previous default.
DEFAULT_VERSION_TTL_S = 2.0
# Inputs one ingress replica holds at once (fetched bytes and decoded tensors);
# a call that would exceed it is shed with 429 before any work is done.
MAX_INFLIGHT_ENV = "TRIGGERFISH_MAX_INFLIGHT"
DEFAULT_MAX_INFLIGHT = 1024
# Deployment-handle calls that take longer than this fail (and the input retries).
HANDLE_TIMEOUT_S = 120.0
# Calls per model in flight from one ingress replica; concurrent requests beyond
# this are merged into the next call (serve/model/coalescer.py).
MAX_CALLS_IN_FLIGHT = 2
# A JSON request names at most 100 inputs of at most a few KB each.
MAX_JSON_BODY_BYTES = 1 << 20


class HandleModelClient:
    """:class:`serve.http.pipeline.ModelClient` over Serve deployment handles.

    A published version's input spec never changes, so ``describe`` answers for
    an explicit version are kept; the default version is asked again after
    :data:`DEFAULT_VERSION_TTL_S`.
    """

    def __init__(self, handles: dict[str, DeploymentHandle], clock=time.monotonic) -> None:  # noqa: ANN001
        self._handles = handles
        self._described: dict[tuple[str, str], VersionInfo] = {}
        self._defaults: dict[str, tuple[float, VersionInfo]] = {}
        self._coalescers: dict[str, CallCoalescer[BatchItem, ItemOutcome | Rejection | Retry]] = {}
        self._clock = clock

    def models(self) -> list[str]:
        return list(self._handles)

    async def describe(self, model: str, version: str | None) -> VersionInfo:
        if version is not None and (model, version) in self._described:
            return self._described[(model, version)]
        if version is None and model in self._defaults:
            at, info = self._defaults[model]
            if self._clock() - at < DEFAULT_VERSION_TTL_S:
                return info
        answer = await asyncio.wait_for(self._handles[model].describe.remote(version), HANDLE_TIMEOUT_S)
        if isinstance(answer, Rejection):
            raise answer.to_error()
        if isinstance(answer, Retry):
            raise TransientError(answer.message)
        self._described[(model, answer.version)] = answer
        if version is None:
            self._defaults[model] = (self._clock(), answer)
        return answer

    async def infer_many(
        self, model: str, items: list[BatchItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]:
        if model not in self._coalescers:
            self._coalescers[model] = CallCoalescer(
                lambda merged, latest, model=model: self._send(model, merged, latest), MAX_CALLS_IN_FLIGHT
            )
        return await self._coalescers[model].call(items, deadline)

    async def _send(
        self, model: str, items: list[BatchItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]:
        timeout = HANDLE_TIMEOUT_S if deadline is None else max(0.1, deadline - time.time())
        return await asyncio.wait_for(self._handles[model].infer_many.remote(items, deadline), timeout)

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


def _decoder() -> tuple[Any, int]:
    """The image decoder and its thread count.

    ``TRIGGERFISH_DECODE=gpu`` (for an ingress on a GPU node) decodes JPEGs with
    nvJPEG, one thread per GPU, falling back to the CPU per image and entirely when
    no GPU decoder is available. Otherwise: Pillow, whose libjpeg decoding releases
    the GIL, with one thread per CPU this replica has.
    """
    mode = os.environ.get("TRIGGERFISH_DECODE", "cpu").strip().lower()
    if mode not in ("cpu", "gpu"):
        raise ConfigError(f"TRIGGERFISH_DECODE must be 'cpu' or 'gpu', got {mode!r}")
    if mode == "gpu":
        from serve.imaging.gpu_decode import gpu_decode_available, prepare_batch_gpu

        if gpu_decode_available():

            def prepare(data: bytes, spec, pre, max_pixels: int):  # noqa: ANN001,ANN202
                [outcome] = prepare_batch_gpu([data], spec, pre, max_pixels=max_pixels)
                if isinstance(outcome, PermanentError):
                    raise outcome
                return outcome

            return prepare, 1
        logger.warning("TRIGGERFISH_DECODE=gpu but no GPU JPEG decoder is available: decoding on the CPU")
    from serve.imaging.cpu_decode import prepare_image

    return prepare_image, replica_cpus()


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` as soon as it is known to exceed ``limit`` (never buffered whole)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _deadline(request: Request, default_s: float) -> float:
    """The caller's deadline (epoch seconds) from its header, else ``default_s`` from now."""
    raw = request.headers.get(DEADLINE_HEADER)
    now = time.time()
    try:
        value = float(raw) if raw else now + default_s
    except ValueError:
        value = now + default_s
    return min(max(value, now), now + default_s)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Routes HTTP calls to the per-model deployments."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        configure_json_logging()
        self._settings = load_settings()
        self._client = HandleModelClient(models)
        # Decoding releases the GIL inside libjpeg: one thread per CPU this replica has.
        self._decode = ThreadPoolExecutor(max_workers=replica_cpus(), thread_name_prefix="decode")
        self._gcs = GcsClient.from_environment()
        self._pipeline = MeteredPipeline(
            InferencePipeline(self._settings, self._client, self._gcs, self._decode), self._settings.default_model, models
        )
        self._oip = OipService(self._settings, HandleOipClient(models, self._client), self._decode)
        self._auth = AuthConfig.from_env(os.environ)
        self._verifier = TokenVerifier(self._auth) if self._auth.enabled else None
        self._max_inflight = int(os.environ.get(MAX_INFLIGHT_ENV) or DEFAULT_MAX_INFLIGHT)
        self._inflight = 0

    @api.post("/v1/infer")
    async def infer(self, request: Request) -> JSONResponse:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        deadline = _deadline(request, self._settings.request_timeout_s)
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await self._admitted(1, self._infer_bytes(request, deadline))
        raw = await _read_bounded(request, MAX_JSON_BODY_BYTES)
        if raw is None:
            return JSONResponse(
                {"error": "body_too_large", "message": f"a request body is at most {MAX_JSON_BODY_BYTES} bytes"},
                status_code=413,
            )
        try:
            body = parse_json_bounded(raw)
            if isinstance(body, dict) and "requests" in body:
                await self._authorize_internal(request)
            requests = parse_infer_body(body)
        except AuthError as err:
            return JSONResponse({"error": "unauthorized", "message": str(err)}, status_code=403)
        except (ValueError, ValidationError) as err:
            return JSONResponse({"error": "bad_request", "message": str(err)[:2000]}, status_code=400)
        return await self._admitted(len(requests), self._process(requests, deadline))

    async def _process(self, requests: list[InferenceRequest], deadline: float) -> JSONResponse:
        return self._respond(await self._pipeline.process_many(requests, deadline))

    async def _authorize_internal(self, request: Request) -> None:
        """The internal form sets generations and request ids: only the functions may send it."""
        if self._verifier is not None:
            await asyncio.to_thread(self._verifier.caller, request.headers.get("authorization"))

    async def _admitted(self, inputs: int, work) -> JSONResponse:  # noqa: ANN001 - a coroutine
        """Run ``work`` unless it would push this replica past its in-flight bound (then 429)."""
        if self._inflight + inputs > self._max_inflight:
            work.close()
            metrics.record_shed(metrics.UNATTRIBUTED, "ingress", inputs)
            return JSONResponse(
                {"error": "overloaded", "message": f"{self._inflight} inputs in flight, limit {self._max_inflight}"},
                status_code=429,
                headers={"Retry-After": "2"},
            )
        self._inflight += inputs
        try:
            return await work
        finally:
            self._inflight -= inputs

    async def _infer_bytes(self, request: Request, deadline: float) -> JSONResponse:
        limit = self._settings.max_image_bytes
        raw = await _read_bounded(request, limit)
        if raw is None:
            return JSONResponse(
                {"error": "image_too_large", "message": f"body is over the limit of {limit} bytes"}, status_code=413
            )
        if not raw:
            return JSONResponse({"error": "bad_request", "message": "empty body"}, status_code=400)
        params = request.query_params
        try:
            outcome: Processed | BaseException = await self._pipeline.process_bytes(
                raw, params.get("model"), params.get("version"), f"http-{uuid.uuid4().hex}", deadline
            )
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            outcome = err
        return self._respond([outcome])

    def _respond(self, outcomes: list[Processed | BaseException]) -> JSONResponse:
        results: list[dict[str, Any]] = []
        transient: list[str] = []
        retry_after = 0.0
        shed = True
        for outcome in outcomes:
            cause = unwrap(outcome) if isinstance(outcome, BaseException) else outcome
            if isinstance(cause, Processed):
                results.append(cause.to_dict())
                continue
            if isinstance(cause, PermanentError):  # not recorded: should not happen, but say so
                results.append({"status": "error", "error": {"reason": cause.reason, "message": cause.message}})
                continue
            if isinstance(cause, ShedError):
                retry_after = max(retry_after, cause.retry_after_s)
            else:
                shed = False
                logger.error("transient failure: %r", cause, exc_info=cause if not isinstance(cause, TransientError) else None)
            transient.append(str(cause) or repr(cause))
            results.append({"status": "retry", "error": {"message": str(cause) or repr(cause)}})
        if transient:
            status = 429 if shed else 503
            return JSONResponse(
                {"error": "overloaded" if shed else "transient", "message": transient[0], "results": results},
                status_code=status,
                headers={"Retry-After": str(max(1, round(retry_after)) if shed else 5)},
            )
        return JSONResponse({"results": results})

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        """Ready when every model deployment answers and has a healthy, loaded default version."""
        try:
            stats = await asyncio.wait_for(self._client.stats(), timeout=10)
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            return JSONResponse({"status": "unavailable", "message": repr(err)}, status_code=503)
        not_ready = [m for m, s in stats.items() if not s.get("default_version") or not s.get("healthy", True)]
        if not_ready:
            return JSONResponse({"status": "unavailable", "models_not_ready": not_ready}, status_code=503)
        return JSONResponse({"status": "ok", "models": list(stats)})

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        return JSONResponse(await self._client.stats())

    @api.get("/v1/stats")
    async def stats(self) -> JSONResponse:
        return JSONResponse(await self._client.stats())

    # -- Open Inference Protocol (KServe v2) ---------------------------------------------------
    @api.get("/v2/health/live")
    async def oip_live(self) -> Response:
        return self._oip.live()

    @api.get("/v2/health/ready")
    async def oip_ready(self) -> Response:
        return await self._oip.ready()

    @api.get("/v2")
    async def oip_server_metadata(self) -> Response:
        return self._oip.server_metadata()

    @api.get("/v2/models/{model}")
    async def oip_model_metadata(self, model: str) -> Response:
        return await self._oip.model_metadata(model, None)

    @api.get("/v2/models/{model}/versions/{version}")
    async def oip_version_metadata(self, model: str, version: str) -> Response:
        return await self._oip.model_metadata(model, version)

    @api.get("/v2/models/{model}/ready")
    async def oip_model_ready(self, model: str) -> Response:
        return await self._oip.model_ready(model, None)

    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def oip_version_ready(self, model: str, version: str) -> Response:
        return await self._oip.model_ready(model, version)

    @api.post("/v2/models/{model}/infer")
    async def oip_infer(self, model: str, request: Request) -> Response:
        return await self._oip_infer(model, None, request)

    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def oip_version_infer(self, model: str, version: str, request: Request) -> Response:
        return await self._oip_infer(model, version, request)

    async def _oip_infer(self, model: str, version: str | None, request: Request) -> Response:
        call = await self._oip.prepare(model, version, request)
        if not isinstance(call, InferCall):
            return call
        deadline = _deadline(request, self._settings.request_timeout_s)
        return await self._admitted(call.images, self._oip.run(call, deadline))


__all__ = ["Ingress", "parse_infer_body"]
