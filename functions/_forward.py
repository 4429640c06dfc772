"""What the functions do after parsing: check sources, forward to Serve, record errors.

The outcome decides acknowledgement: returning normally acknowledges the
Pub/Sub message, raising :class:`~shared.errors.TransientError` makes the
function fail so that Pub/Sub redelivers (with backoff, up to the
subscription's dead-letter bound).

Timeouts nest from the ack deadline down (numbers as deployed by Terraform):
the subscription's ack deadline (180 s) bounds the function's timeout (ack
deadline minus 30 s: 150 s), which bounds an event's deadline
(``TRIGGERFISH_REQUEST_TIMEOUT_S``, 120 s from arrival: the wait for a call slot,
every call to Serve for the event, split calls included, and Serve's own work,
which stops at the deadline it is sent) plus the error records written after it
(:data:`RECORD_TIMEOUT_S` each).
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
from shared.gcs_limits import RequestRefused
from shared.messages import DEADLINE_HEADER, InferenceRequest
from shared.result_store import store_result
from shared.results import InferenceResult
from shared.uris import GcsUri, check_allowed, parse_gcs_uri

logger = logging.getLogger(__name__)

#: Cloud Storage's time limit for writing one error record; records are written after
#: the event's deadline at worst, so this is part of the margin below the function timeout.
RECORD_TIMEOUT_S = 10.0


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
    """Write the error result for a request that can never succeed.

    Where Cloud Storage refuses the result's name for ``source`` (a 400: retrying
    cannot help), the record goes under ``_invalid/``, found by request id.
    """
    settings = get_settings()
    result = InferenceResult.failure(
        request, err.reason, err.message, model=request.model or settings.default_model
    )
    try:
        uri = asyncio.run(_store(settings.results_bucket, result, source))
    except RequestRefused as refused:
        if source is None:
            raise
        logger.warning(
            "Cloud Storage refused the result name for %s; recording under the request id",
            request.uri, extra={"request_id": request.request_id, "detail": refused.message},
        )  # fmt: skip
        uri = asyncio.run(_store(settings.results_bucket, result, None))
    logger.warning(
        "recorded error result",
        extra={"reason": err.reason.value, "detail": err.message, "result_uri": uri,
               "request_id": request.request_id},
    )  # fmt: skip
    return uri


async def _store(bucket: str, result: InferenceResult, source: GcsUri | None) -> str:
    # Error records are rare on this side (malformed messages, bad URIs): a client
    # per call keeps the functions' request path free of event-loop plumbing.
    gcs = GcsClient.from_environment(timeout_s=RECORD_TIMEOUT_S)
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
    # From the event's arrival: recording its invalid inputs counts against it too.
    deadline = time.time() + settings.request_timeout_s
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
    answers = get_merger().submit(valid, deadline)
    results: list[dict] = []
    for request, answer in zip(valid, answers, strict=True):
        if isinstance(answer, _Rejected):
            # Serve refused this request on its own (never just a call it was merged
            # into: see _post): retrying cannot help.
            record_failure(
                request, PermanentError(ErrorReason.MALFORMED_MESSAGE, str(answer)), parse_gcs_uri(request.uri)
            )
        elif isinstance(answer, BaseException):
            raise answer
        else:
            _note_unrecorded(request, answer)
            results.append(answer)
    return results


def _note_unrecorded(request: InferenceRequest, answer: dict) -> None:
    """Log or record the answers whose error did not land where the caller looks for it."""
    if answer.get("status") != "error":
        return
    error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
    if answer.get("superseded"):
        # A stored result (an ok one, or a newer version's) outranks this request's error:
        # the result object keeps the other; Serve keeps the error at ``error_record_uri``
        # (under _superseded/, by request id), and the log says so where operators look.
        logger.warning(
            "request %s for %s failed (%s), but a stored result outranks the error and was kept; "
            "the error is at %s",
            request.request_id, request.uri, error.get("reason"), answer.get("error_record_uri"),
            extra={"request_id": request.request_id, "uri": request.uri, "reason": error.get("reason"),
                   "detail": error.get("message"), "result_uri": answer.get("result_uri"),
                   "error_record_uri": answer.get("error_record_uri")},
        )  # fmt: skip
        return
    if answer.get("result_uri"):
        return
    # Serve could not record the error itself (Cloud Storage refused the result's name):
    # record it by request id, so the caller still finds a typed outcome.
    try:
        reason = ErrorReason(error.get("reason"))
    except ValueError:
        reason = ErrorReason.INFERENCE_FAILED
    record_failure(request, PermanentError(reason, str(error.get("message") or "Serve recorded no result")))


class _Rejected(Exception):
    """Serve refused the request body itself (400 ``bad_request``)."""


@functools.cache
def get_merger() -> CallMerger[InferenceRequest, dict]:
    """One merger per function instance: concurrent invocations share Serve calls."""
    return CallMerger(_post, max_in_flight=2, max_items=100)


def _post(requests: list[InferenceRequest], deadline: float) -> list[dict | BaseException]:
    """Serve's answer per request of ``requests``, by ``deadline``.

    Serve refusing a merged call's body (400 ``bad_request``) does not say which
    event is at fault, or whether any is (a field one deploy knows and the other
    does not): the call is split in halves and each half sent again, down to single
    events, so only an event refused on its own is answered :class:`_Rejected`.

    Raises:
        TransientError: for every request (Serve unreachable, no ID token, an answer
            without per-request results); a request whose deadline passed is answered
            with one.
    """
    answers = _post_once(requests, deadline)
    if not isinstance(answers, _Rejected):
        return answers
    if len(requests) == 1:
        return [answers]
    half = len(requests) // 2
    logger.warning(
        "Serve refused a merged call of %d requests; sending it again in halves", len(requests),
        extra={"detail": str(answers)},
    )  # fmt: skip
    return _post_part(requests[:half], deadline) + _post_part(requests[half:], deadline)


def _post_part(requests: list[InferenceRequest], deadline: float) -> list[dict | BaseException]:
    """One half of a split call: a failure stays with its half, the other keeps its answers."""
    try:
        return _post(requests, deadline)
    except TransientError as err:
        return [err] * len(requests)


def _post_once(requests: list[InferenceRequest], deadline: float) -> list[dict | BaseException] | _Rejected:
    """One call to Serve for ``requests``: per request its result or failure, or the refusal of all."""
    settings = get_settings()
    remaining = min(settings.request_timeout_s, deadline - time.time())
    if remaining <= 0:
        # Answered per request: the halves of a split call sent earlier keep their answers.
        late = TransientError(f"the deadline of {len(requests)} requests passed before Serve was called")
        return [late] * len(requests)
    # Defaults stay off the wire (a live request reads as it did before classes existed).
    body = {"requests": [r.model_dump(mode="json", exclude_defaults=True) for r in requests]}
    # Serve stops working on these inputs when this function has given up on them.
    headers = {DEADLINE_HEADER: f"{deadline:.3f}"}
    tokens = get_token_source()
    try:
        if tokens is not None:
            headers.update(tokens.header())
    except Exception as err:  # noqa: BLE001 - the metadata server may be briefly unavailable
        raise TransientError(f"could not mint an ID token for Serve: {err!r}") from err
    try:
        response = get_http_client().post(
            f"{settings.serve_url}/v1/infer", json=body, headers=headers,
            # Never past the deadline: the function must answer before its own timeout.
            timeout=httpx.Timeout(remaining, connect=min(5.0, remaining)),
        )  # fmt: skip
    except httpx.HTTPError as err:
        raise TransientError(f"Serve at {settings.serve_url} unreachable: {err!r}") from err
    if response.status_code == 200:
        results = response.json().get("results")
        if not isinstance(results, list) or len(results) != len(requests):
            # Answers are matched to requests by position: a short list matches none.
            raise TransientError(f"Serve answered {len(requests)} requests with: {response.text[:300]}")
        return results
    if response.status_code == 400 and _error_code(response) == "bad_request":
        return _Rejected(f"Serve rejected the request (400): {response.text[:300]}")
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
