"""What the functions do after parsing: check sources, forward to Serve, record errors.

The outcome decides acknowledgement: returning normally acknowledges the
Pub/Sub message, raising :class:`~shared.errors.TransientError` makes the
function fail so that Pub/Sub redelivers (with backoff, up to the
subscription's dead-letter bound).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence

import httpx

from functions._merge import CallMerger
from shared.auth import AuthConfig, TokenSource
from shared.config import Settings, load_settings
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.gcs import GcsClient
from shared.messages import DEADLINE_HEADER, InferenceRequest
from shared.result_store import store_result
from shared.results import InferenceResult
from shared.uris import GcsUri, check_allowed, parse_gcs_uri

logger = logging.getLogger(__name__)


@functools.cache
def get_settings() -> Settings:
    """Settings for this function instance, read once."""
    return load_settings()


@functools.cache
def get_http_client() -> httpx.Client:
    """One pooled HTTP client per function instance."""
    # Idle connections are dropped before Serve's proxy closes them (5 s keep-alive), so a
    # POST never goes out on a connection the server is closing.
    return httpx.Client(
        timeout=httpx.Timeout(get_settings().request_timeout_s, connect=5.0),
        limits=httpx.Limits(keepalive_expiry=2.0),
    )


@functools.cache
def get_token_source() -> TokenSource | None:
    """ID tokens for Serve when the deployment authenticates callers (``TRIGGERFISH_SERVE_AUDIENCE``)."""
    import os

    config = AuthConfig.from_env(os.environ)
    return TokenSource(config.audience) if config.enabled else None


def record_failure(
    request: InferenceRequest, err: PermanentError, source: GcsUri | None = None
) -> str | None:
    """Write the error result for a request that can never succeed."""
    settings = get_settings()
    result = InferenceResult.failure(
        request, err.reason, err.message, model=request.model or settings.default_model
    )
    uri = asyncio.run(_store(settings.results_bucket, result, source))
    logger.warning(
        "recorded error result",
        extra={"reason": err.reason.value, "detail": err.message, "result_uri": uri},
    )
    return uri


async def _store(bucket: str, result: InferenceResult, source: GcsUri | None) -> str:
    # Error records are rare on this side (malformed messages, bad URIs): a client
    # per call keeps the functions' request path free of event-loop plumbing.
    gcs = GcsClient.from_environment()
    try:
        return (await store_result(gcs, bucket, result, source)).uri
    finally:
        await gcs.close()


def forward(requests: Sequence[InferenceRequest]) -> list[dict]:
    """Check each request's source, record the permanent failures, forward the rest.

    Returns:
        Serve's per-request results (``[]`` when nothing was forwarded).

    Raises:
        TransientError: Serve unreachable, overloaded, timing out or answering 5xx.
    """
    settings = get_settings()
    valid: list[InferenceRequest] = []
    for request in requests:
        source: GcsUri | None = None
        try:
            source = parse_gcs_uri(request.uri)
            check_allowed(source, settings.allowed_buckets)
        except PermanentError as err:
            record_failure(request, err, source)
            continue
        valid.append(request)
    if not valid:
        return []
    answers = get_merger().submit(valid, time.time() + settings.request_timeout_s)
    results: list[dict] = []
    for request, answer in zip(valid, answers, strict=True):
        if isinstance(answer, _Rejected):
            # Serve's own validation refused a request we validated: retrying cannot help.
            record_failure(
                request, PermanentError(ErrorReason.MALFORMED_MESSAGE, str(answer)), parse_gcs_uri(request.uri)
            )
        elif isinstance(answer, BaseException):
            raise answer
        else:
            results.append(answer)
    return results


class _Rejected(Exception):
    """Serve refused the request body itself (400 ``bad_request``)."""


@functools.cache
def get_merger() -> CallMerger[InferenceRequest, dict]:
    """One merger per function instance: concurrent invocations share Serve calls."""
    return CallMerger(_post, max_in_flight=2, max_items=100)


def _post(requests: list[InferenceRequest], deadline: float) -> list[dict | BaseException]:
    """One call to Serve for ``requests``; per request its result or its failure.

    Raises:
        TransientError: for every request (Serve unreachable, no ID token, an answer
            without per-request results).
    """
    settings = get_settings()
    body = {"requests": [r.model_dump(mode="json", exclude_none=True) for r in requests]}
    # Serve stops working on these inputs when this function has given up on them.
    headers = {DEADLINE_HEADER: f"{deadline:.3f}"}
    tokens = get_token_source()
    try:
        if tokens is not None:
            headers.update(tokens.header())
    except Exception as err:  # noqa: BLE001 - the metadata server may be briefly unavailable
        raise TransientError(f"could not mint an ID token for Serve: {err!r}") from err
    try:
        response = get_http_client().post(f"{settings.serve_url}/v1/infer", json=body, headers=headers)
    except httpx.HTTPError as err:
        raise TransientError(f"Serve at {settings.serve_url} unreachable: {err!r}") from err
    if response.status_code == 200:
        return response.json().get("results", [])
    if response.status_code == 400 and _error_code(response) == "bad_request":
        rejected = _Rejected(f"Serve rejected the request (400): {response.text[:300]}")
        return [rejected] * len(requests)
    # Overload (429), a proxy's 404 during a redeploy, 5xx: all retryable; where Serve
    # says which inputs are done, only the others are retried.
    transient = TransientError(f"Serve answered {response.status_code}: {response.text[:300]}")
    try:
        per_request = response.json().get("results")
    except ValueError:
        per_request = None
    if not isinstance(per_request, list) or len(per_request) != len(requests):
        raise transient
    return [transient if r.get("status") == "retry" else r for r in per_request]


def _error_code(response: httpx.Response) -> str | None:
    try:
        body = response.json()
    except ValueError:
        return None
    return body.get("error") if isinstance(body, dict) else None
