"""The HTTP ingress deployment: ``POST /v1/infer`` and health/introspection routes.

Used by the Cloud Functions (normalized requests) and directly by clients
(``{"uris": [...]}`` or a raw image body). Status codes tell callers whether to
retry: 200 when every input has a stored result (``ok`` or ``error``), 400 for
a body that is not a request at all (``bad_request``) or a deadline header that is
not one (``bad_deadline``), 403 without an acceptable token, 429 with ``Retry-After``
when the service sheds load, 503 with ``Retry-After`` when something transient failed
(a model starting from zero, the token check's own infrastructure, a deadline that
passed).

Authentication (``TRIGGERFISH_AUTH``, :mod:`shared.auth`): every route but the health
probes (:data:`HEALTH_ROUTES`) needs a Google ID token; the internal form only from an
invoker. Deadlines: :mod:`serve.http.deadline`. Admission, before a body is read:
:mod:`serve.http.admission`.

The Open Inference Protocol (KServe v2) routes under ``/v2`` delegate to
:mod:`serve.http.oip_service`.
"""

# No `from __future__ import annotations`: FastAPI resolves the route
# signatures of this class at runtime and would miss `Request`.
import asyncio
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve import metrics
from serve.cpus import lower_thread_priority, replica_cpus
from serve.http.admission import AdmissionGate, Cost, Shed, Ticket
from serve.http.body_window import bound_body_buffering
from serve.http.call_pool import CallPool
from serve.http.deadline import (
    HANDLE_GRACE_S,
    BadDeadline,
    CallDeadline,
    DeadlinePassed,
    parse_deadline,
)
from serve.http.metered import MeteredPipeline
from serve.http.model_client import HandleModelClient, ModelStarting, waiting_for_model
from serve.http.oip_service import HandleOipClient, OipService
from serve.http.pipeline import (
    BULK_PREPARES_PER_THREAD,
    LIVE_STORAGE_PER_THREAD,
    InferencePipeline,
    Processed,
    ShedError,
    unwrap,
)
from shared.auth import (
    AUDIENCE_ENV,
    AUTH_ENV,
    AUTH_REQUIRED,
    AuthConfig,
    AuthError,
    AuthUnavailable,
    TokenVerifier,
)
from shared.config import load_settings
from shared.errors import ConfigError, PermanentError, TransientError
from shared.gcs import GcsClient
from shared.logging import configure_json_logging
from shared.messages import (
    DEADLINE_HEADER,
    NAME_PATTERN,
    InferenceRequest,
    Priority,
    RequestMessage,
    parse_json_bounded,
    public_requests,
)

logger = logging.getLogger(__name__)
api = FastAPI(title="triggerfish", version="1")
MAX_REQUESTS_PER_CALL = 100
# A JSON request names at most 100 inputs of at most a few KB each.
MAX_JSON_BODY_BYTES = 1 << 20
# What one URI input holds before its size is known: the fetched image (most photos
# are well below) and its model-size tensor. The JSON route is admitted by count and
# by this per input.
URI_INPUT_BYTES = 1 << 20
URI_INPUT_COST = Cost(1, URI_INPUT_BYTES)
# An HTTP caller may ask to wait for a model that is starting (scale to zero) until
# its deadline, with this header or the query parameter ``wait`` (``1``/``true``);
# otherwise it gets 503 with Retry-After after COLD_START_GRACE_S. The functions'
# internal form always waits within its deadline.
WAIT_HEADER = "x-triggerfish-wait"
COLD_START_GRACE_S = 10.0
# Routes open without a token (probes); every other route needs one when auth is required.
HEALTH_ROUTES = ("/healthz", "/v2/health/live", "/v2/health/ready")


def parse_infer_body(body: Any) -> list[InferenceRequest]:
    """Accept ``{"requests": [InferenceRequest...]}`` (functions) or a request message (clients).

    A client's own ``request_id`` is namespaced (``http:<id>``): it cannot take the
    form of another entry path's ids.
    """
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    if "requests" in body:
        items = body["requests"]
        if not isinstance(items, list) or not items or len(items) > MAX_REQUESTS_PER_CALL:
            raise ValueError(f"'requests' must be a list of 1..{MAX_REQUESTS_PER_CALL} requests")
        return [InferenceRequest.model_validate(r) for r in items]
    message = RequestMessage.model_validate(body)
    return public_requests(message, f"http-{uuid.uuid4().hex}")


def declared_length(request: Request) -> int | None:
    """The body's ``Content-Length``, or ``None`` when it declares none (or nonsense)."""
    declared = request.headers.get("content-length", "").strip()
    return int(declared) if declared.isdigit() and len(declared) <= 15 else None


async def _read_bounded(request: Request, limit: int) -> bytes | None:
    """The body, or ``None`` as soon as it is known to exceed ``limit`` (never buffered whole)."""
    declared = declared_length(request)
    if declared is not None and declared > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _asks_to_wait(request: Request) -> bool:
    flag = request.headers.get(WAIT_HEADER) or request.query_params.get("wait") or ""
    return flag.strip().lower() in ("1", "true", "yes")


def with_server_timing(response: JSONResponse, **durations_ms: float) -> JSONResponse:
    """``response`` with ``name;dur=ms`` metrics added to its ``Server-Timing`` header."""
    timing = ", ".join(f"{name};dur={ms:.1f}" for name, ms in durations_ms.items())
    earlier = response.headers.get("server-timing")
    response.headers["server-timing"] = f"{earlier}, {timing}" if earlier else timing
    return response


def _error(code: str, message: str, status: int, retry_after: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)


def _deadline_refusal(err: Exception) -> JSONResponse:
    """The answer for a deadline header that cannot be worked to.

    A malformed header is 400 ``bad_deadline``, not ``bad_request``: the functions
    record ``bad_request`` as a permanent ``malformed_message`` of every event in the
    call, and a bad header is the caller's defect, not the events'.
    """
    if isinstance(err, BadDeadline):
        return _error("bad_deadline", str(err), 400)
    return _error("deadline_passed", str(err), 503, retry_after=1)


@serve.deployment(name="Ingress", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Ingress:
    """Routes HTTP calls to the per-model deployments."""

    def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        configure_json_logging()
        # A body is read as the call reads it, after admission, not queued whole on arrival.
        bound_body_buffering()
        self._settings = load_settings()
        try:
            self._auth = AuthConfig.from_env(os.environ)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        if self._auth.required and not self._auth.audience:
            raise ConfigError(
                f"{AUTH_ENV} is {AUTH_REQUIRED!r} but {AUDIENCE_ENV} is unset: set the ID tokens' audience, "
                f"or {AUTH_ENV}=off to serve without authentication (the local stack does)"
            )
        if not self._auth.required:
            logger.warning("%s=off: every route is open to anyone who can reach it", AUTH_ENV)
        self._verifier = TokenVerifier(self._auth) if self._auth.required else None
        self._client = HandleModelClient(models)
        # Decoding releases the GIL inside libjpeg: one thread per CPU this replica has, per
        # traffic class; bulk threads run at a lower OS priority, so live decodes come first.
        threads = replica_cpus()
        # Concurrent live calls' decodes are taken in turn (a one-image call is not queued
        # behind every image of a larger one); a backfill's go first come first served.
        self._decode = CallPool(threads, thread_name_prefix="decode")
        self._bulk_decode = ThreadPoolExecutor(
            max_workers=threads,
            thread_name_prefix="decode-bulk",
            initializer=lower_thread_priority,
        )
        self._gcs = GcsClient.from_environment()
        pipeline = InferencePipeline(
            self._settings,
            self._client,
            self._gcs,
            self._decode,
            bulk_decode_executor=self._bulk_decode,
            bulk_prepares=BULK_PREPARES_PER_THREAD * threads,
            live_storage=LIVE_STORAGE_PER_THREAD * threads,
        )
        self._pipeline = MeteredPipeline(pipeline, self._settings.default_model, models)
        s = self._settings
        self._gate = AdmissionGate(
            s.max_inflight_inputs, s.max_inflight_bytes, s.admission_wait_s,
            bulk_min_share=s.bulk_min_share, live_headroom=s.live_headroom,
        )  # fmt: skip
        self._oip = OipService(
            self._settings, HandleOipClient(models, self._client), self._decode, self._gate
        )

    # -- authentication ------------------------------------------------------------------------
    async def _refusal(self, request: Request, internal: bool = False) -> JSONResponse | None:
        """``None`` when the caller may use this route, else the answer (403, or 503 when auth itself fails)."""
        if self._verifier is None:
            return None
        check = self._verifier.caller if internal else self._verifier.public_caller
        try:
            await asyncio.to_thread(check, request.headers.get("authorization"))
        except AuthError as err:
            return _error("unauthorized", str(err), 403)
        except AuthUnavailable as err:
            return _error("auth_unavailable", str(err), 503, retry_after=5)
        return None

    def _model_wait(self, request: Request, deadline: CallDeadline, internal: bool) -> float:
        """Until when (epoch seconds) this call waits for a model that is starting."""
        if internal or _asks_to_wait(request):
            return deadline.work
        return min(deadline.work, time.time() + COLD_START_GRACE_S)

    # -- /v1/infer -------------------------------------------------------------------------------
    @api.post("/v1/infer")
    async def infer(self, request: Request) -> JSONResponse:
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        try:
            deadline = parse_deadline(request.headers.get(DEADLINE_HEADER), self._settings.request_timeout_s)
        except (BadDeadline, DeadlinePassed) as err:
            return _deadline_refusal(err)
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type.startswith("image/") or content_type == "application/octet-stream":
            return await self._infer_bytes(request, deadline)
        raw = await _read_bounded(request, MAX_JSON_BODY_BYTES)
        if raw is None:
            return _error("body_too_large", f"a request body is at most {MAX_JSON_BODY_BYTES} bytes", 413)
        try:
            body = parse_json_bounded(raw)
            internal = isinstance(body, dict) and "requests" in body
            requests = parse_infer_body(body)
        except (ValueError, ValidationError) as err:
            return _error("bad_request", str(err)[:2000], 400)
        if internal:
            refused = await self._refusal(request, internal=True)
            if refused is not None:
                return refused
        # The JSON body (at most 1 MiB) is read before admission: only then is the count known.
        cost = Cost(0, len(raw)) + Cost(len(requests), len(requests) * URI_INPUT_BYTES)
        # A call is bulk only when all of it is: live work never waits in the bulk line.
        bulk = all(r.priority is Priority.BULK for r in requests)
        priority = Priority.BULK if bulk else Priority.LIVE
        with waiting_for_model(self._model_wait(request, deadline, internal)):
            return await self._admitted(
                cost, deadline, lambda ticket: self._process(requests, deadline, ticket), priority
            )

    async def _process(self, requests: list[InferenceRequest], deadline: CallDeadline, ticket: Ticket) -> JSONResponse:
        released: set[int] = set()

        def settled(i: int) -> None:  # input i's answer is known: its hold goes back to the line
            if i not in released:
                released.add(i)
                ticket.adjust(ticket.cost - URI_INPUT_COST)

        # A live call gives its hold back input by input, so the line of live calls moves with
        # every finished input. A bulk call keeps it to the end: a backfill's work in flight
        # stays bounded by whole calls, which leaves the ingress to live work.
        live = ticket.priority is Priority.LIVE
        outcomes = await self._pipeline.process_many(requests, deadline.work, settled if live else None)
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, BaseException) and isinstance(unwrap(outcome), ShedError):
                self._gate.shed[request.priority] += 1  # a model queue shed it: counted as admission's are
        return self._respond(outcomes)

    async def _admitted(
        self,
        cost: Cost,
        deadline: CallDeadline,
        work: Callable[[Ticket], Coroutine[Any, Any, JSONResponse]],
        priority: Priority = Priority.LIVE,
    ) -> JSONResponse:
        """Run ``work(ticket)`` once admitted (429 if shed), and answer by the work deadline (503 after).

        The answer's ``Server-Timing`` header says how long the call waited for admission
        and how long its work took (``admission``, ``work``, in milliseconds), and after
        :meth:`_respond`, its longest result write (``store``).
        """
        arrived = time.monotonic()
        try:
            ticket = await self._gate.admit(cost, deadline.remaining(), priority)
        except Shed as err:
            metrics.record_shed(metrics.UNATTRIBUTED, "ingress", cost.inputs, priority)
            return _error("overloaded", err.message, 429, retry_after=err.retry_after_s)
        admitted = time.monotonic()
        async with ticket:
            response = await self._bounded(work(ticket), deadline)
        return with_server_timing(
            response, admission=(admitted - arrived) * 1000, work=(time.monotonic() - admitted) * 1000
        )

    async def _bounded(self, work, deadline: CallDeadline) -> JSONResponse:  # noqa: ANN001 - a coroutine
        # The caller stops reading at its deadline: answer before, so it gets a retryable answer.
        try:
            return await asyncio.wait_for(work, max(0.0, deadline.remaining()) + HANDLE_GRACE_S)
        except TimeoutError:
            return _error("transient", "the call did not finish before its deadline", 503, retry_after=5)

    async def _infer_bytes(self, request: Request, deadline: CallDeadline) -> JSONResponse:
        params = request.query_params
        model, version = params.get("model"), params.get("version")
        try:
            priority = Priority(params.get("priority", Priority.LIVE.value))
        except ValueError:
            return _error(
                "bad_request",
                f"priority {params.get('priority', '')[:50]!r} is not one of live, bulk",
                400,
            )
        if model is not None and model not in self._client.models():
            return _error("bad_request", f"unknown model {model!r} (models: {sorted(self._client.models())})", 400)
        if version is not None and not re.fullmatch(NAME_PATTERN, version):
            return _error("bad_request", f"version {version[:200]!r} is not a version name", 400)
        limit = self._settings.max_image_bytes
        declared = declared_length(request)
        if declared is not None and declared > limit:
            return _error("image_too_large", f"body is {declared} bytes, over the limit of {limit} bytes", 413)
        # Admitted by its real cost before it is read: its declared length (the limit when undeclared).
        cost = Cost(1, limit if declared is None else declared)
        with waiting_for_model(self._model_wait(request, deadline, internal=False)):
            return await self._admitted(
                cost, deadline, lambda _: self._read_and_infer(request, model, version, deadline, limit, priority),
                priority,
            )  # fmt: skip

    async def _read_and_infer(
        self, request: Request, model: str | None, version: str | None, deadline: CallDeadline, limit: int,
        priority: Priority,
    ) -> JSONResponse:  # fmt: skip
        raw = await _read_bounded(request, limit)
        if raw is None:
            return _error("image_too_large", f"body is over the limit of {limit} bytes", 413)
        if not raw:
            return _error("bad_request", "empty body", 400)
        try:
            outcome: Processed | BaseException = await self._pipeline.process_bytes(
                raw, model, version, f"http-{uuid.uuid4().hex}", deadline.work, priority
            )
        except Exception as err:  # noqa: BLE001 - mapped to a status below
            outcome = err
        return self._respond([outcome])

    def _respond(self, outcomes: list[Processed | BaseException]) -> JSONResponse:
        results: list[dict[str, Any]] = []
        transient: list[str] = []
        shed_after = 0.0  # the longest Retry-After of the model queues that shed
        unavailable_after = 5.0  # 503: a starting model says how long it takes
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
                shed_after = max(shed_after, cause.retry_after_s)
            else:
                shed = False
                if isinstance(cause, ModelStarting):
                    unavailable_after = max(unavailable_after, cause.retry_after_s)
                else:
                    exc_info = cause if not isinstance(cause, TransientError) else None
                    logger.error("transient failure: %r", cause, exc_info=exc_info)
            transient.append(str(cause) or repr(cause))
            results.append({"status": "retry", "error": {"message": str(cause) or repr(cause)}})
        if transient:
            response = JSONResponse(
                {"error": "overloaded" if shed else "transient", "message": transient[0], "results": results},
                status_code=429 if shed else 503,
                headers={"Retry-After": str(max(1, round(shed_after if shed else unavailable_after)))},
            )
        else:
            response = JSONResponse({"results": results})
        # The longest result write of the call, its wait for a storage slot included.
        stored = [o.store_ms for o in outcomes if isinstance(o, Processed) and o.store_ms is not None]
        return with_server_timing(response, store=max(stored)) if stored else response

    # -- health and introspection --------------------------------------------------------------
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
    async def models(self, request: Request) -> JSONResponse:
        return await self._refusal(request) or JSONResponse(await self._client.stats())

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> JSONResponse:
        return await self._refusal(request) or JSONResponse(await self._client.stats())

    @api.get("/v1/admission")
    async def admission(self, request: Request) -> JSONResponse:
        """This replica's admission: inputs and bytes held now, the peaks so far, the limits, calls waiting."""
        return await self._refusal(request) or JSONResponse(self._gate.snapshot())

    # -- Open Inference Protocol (KServe v2) ---------------------------------------------------
    @api.get("/v2/health/live")
    async def oip_live(self) -> Response:
        return self._oip.live()

    @api.get("/v2/health/ready")
    async def oip_ready(self) -> Response:
        return await self._oip.ready()

    @api.get("/v2")
    async def oip_server_metadata(self, request: Request) -> Response:
        return await self._refusal(request) or self._oip.server_metadata()

    @api.get("/v2/models/{model}")
    async def oip_model_metadata(self, model: str, request: Request) -> Response:
        return await self._oip_metadata(model, None, request)

    @api.get("/v2/models/{model}/versions/{version}")
    async def oip_version_metadata(self, model: str, version: str, request: Request) -> Response:
        return await self._oip_metadata(model, version, request)

    @api.get("/v2/models/{model}/ready")
    async def oip_model_ready(self, model: str, request: Request) -> Response:
        return await self._refusal(request) or await self._oip.model_ready(model, None)

    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def oip_version_ready(self, model: str, version: str, request: Request) -> Response:
        return await self._refusal(request) or await self._oip.model_ready(model, version)

    @api.post("/v2/models/{model}/infer")
    async def oip_infer(self, model: str, request: Request) -> Response:
        return await self._oip_infer(model, None, request)

    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def oip_version_infer(self, model: str, version: str, request: Request) -> Response:
        return await self._oip_infer(model, version, request)

    async def _oip_metadata(self, model: str, version: str | None, request: Request) -> Response:
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        deadline = parse_deadline(None, self._settings.request_timeout_s)
        with waiting_for_model(self._model_wait(request, deadline, internal=False)):
            return await self._oip.model_metadata(model, version)

    async def _oip_infer(self, model: str, version: str | None, request: Request) -> Response:
        refused = await self._refusal(request)
        if refused is not None:
            return refused
        try:
            deadline = parse_deadline(request.headers.get(DEADLINE_HEADER), self._settings.request_timeout_s)
        except BadDeadline as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        except DeadlinePassed as err:
            return JSONResponse({"error": str(err)}, status_code=503, headers={"Retry-After": "1"})
        with waiting_for_model(self._model_wait(request, deadline, internal=False)):
            return await self._oip.infer(model, version, request, deadline)


__all__ = ["HandleModelClient", "Ingress", "parse_infer_body"]
