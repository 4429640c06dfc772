"""Cloud Storage for an asyncio service: the JSON API over one pooled aiohttp session.

The synchronous client costs a thread hop, a ``requests`` session walk (netrc
lookup, CA-bundle stat) and often a metadata read per call; here one read is one
``GET ...?alt=media`` (the object's generation comes back in a response header)
and one write is one multipart ``POST`` carrying metadata and a generation
precondition, so that concurrent writers can never interleave a
read-check-write.

With ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server) no credentials are sent;
otherwise Application Default Credentials are refreshed off the event loop.

Every object request is checked against Cloud Storage's documented limits
(:mod:`shared.gcs_limits`) before it is sent, because fake-gcs-server enforces
none of them: a name the cloud refuses is refused locally too, and both raise
:class:`~shared.gcs_limits.RequestRefused`, a permanent error, as a 400 from
Cloud Storage does. A 400 is never retried: the same request cannot succeed.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any
from urllib.parse import quote

import aiohttp

from shared.errors import ErrorReason, PermanentError, SupersededError, TransientError
from shared.gcs_limits import RequestRefused, check_custom_metadata, check_object_name
from shared.uris import GcsUri

GCS_ENDPOINT = "https://storage.googleapis.com"
_SCOPES = ("https://www.googleapis.com/auth/devstorage.read_write",)
# Tokens are refreshed this long before they expire, so no call races an expiry.
_TOKEN_MARGIN_S = 300


class PreconditionFailed(TransientError):
    """The object's generation was not the one a write was conditioned on (HTTP 412)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What one metadata read or one write tells about an object."""

    generation: int
    size: int
    metadata: Mapping[str, str]


def _object_path(bucket: str, name: str) -> str:
    return f"/storage/v1/b/{quote(bucket, safe='')}/o/{quote(name, safe='')}"


class GcsClient:
    """Reads source images and writes result objects; one instance per process and event loop.

    Args:
        endpoint: ``https://storage.googleapis.com`` or an emulator's base URL.
        credentials: ``google.auth`` credentials, or ``None`` for an emulator.
        timeout_s: Per-call limit; a slower call is a :class:`TransientError`.
        connections: Size of the connection pool.
    """

    def __init__(
        self,
        endpoint: str = GCS_ENDPOINT,
        credentials: Any = None,
        timeout_s: float = 30.0,
        connections: int = 64,
    ) -> None:
        self._endpoint = endpoint.rstrip("/")
        self._credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=5)
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._token_lock: asyncio.Lock | None = None

    @classmethod
    def from_environment(cls, timeout_s: float = 30.0) -> GcsClient:
        """The emulator at ``STORAGE_EMULATOR_HOST``, else Cloud Storage with ADC."""
        emulator = os.environ.get("STORAGE_EMULATOR_HOST")
        if emulator:
            if not emulator.startswith(("http://", "https://")):
                emulator = f"http://{emulator}"
            return cls(emulator, None, timeout_s)
        import google.auth

        credentials, _ = google.auth.default(scopes=_SCOPES)
        return cls(GCS_ENDPOINT, credentials, timeout_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        # Created on first use: a session belongs to the running event loop.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._connections, ttl_dns_cache=300),
                # No netrc or proxy lookups per request.
                trust_env=False,
            )
        return self._session

    async def _headers(self) -> dict[str, str]:
        creds = self._credentials
        if creds is None:
            return {}
        if not _fresh(creds):
            if self._token_lock is None:
                self._token_lock = asyncio.Lock()
            async with self._token_lock:
                if not _fresh(creds):  # another call may have refreshed it meanwhile
                    import google.auth.transport.requests

                    await asyncio.to_thread(creds.refresh, google.auth.transport.requests.Request())
        return {"authorization": f"Bearer {creds.token}"}

    # -- reads ---------------------------------------------------------------------------
    async def read(self, uri: GcsUri, generation: str | None, max_bytes: int) -> tuple[bytes, str]:
        """Download ``uri`` (at ``generation`` when given), refusing more than ``max_bytes``.

        Returns:
            The bytes and the generation they belong to.

        Raises:
            PermanentError: ``object_missing``, ``image_too_large``, ``access_denied``
                (the service may not read that object).
            RequestRefused: ``invalid_uri``: Cloud Storage refuses the name (400).
            SupersededError: the named generation was replaced by a newer one.
            TransientError: 429/5xx, timeouts, connection errors.
        """
        check_object_name(uri.bucket, uri.name)
        params = {"alt": "media"}
        if generation:
            params["generation"] = generation
        url = self._endpoint + "/download" + _object_path(uri.bucket, uri.name)
        try:
            async with self._http().get(url, params=params, headers=await self._headers()) as resp:
                if resp.status == 404:
                    await self._raise_missing(uri, generation)
                _raise_for_read(resp.status, uri, await _text(resp) if resp.status >= 300 else "")
                if resp.content_length is not None and resp.content_length > max_bytes:
                    raise PermanentError(
                        ErrorReason.IMAGE_TOO_LARGE,
                        f"{uri} is {resp.content_length} bytes, limit {max_bytes}",
                    )
                data = await _read_limited(resp, uri, max_bytes)
                read_generation = resp.headers.get("x-goog-generation") or generation or ""
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"Cloud Storage unreachable reading {uri}: {err!r}") from err
        return data, read_generation

    async def _raise_missing(self, uri: GcsUri, generation: str | None) -> None:
        if generation:
            current = await self.info(uri.bucket, uri.name)
            if current is not None and current.generation > int(generation):
                raise SupersededError(
                    f"{uri} generation {generation} was replaced by generation {current.generation}"
                )
        suffix = f" generation {generation}" if generation else ""
        raise PermanentError(ErrorReason.OBJECT_MISSING, f"{uri}{suffix} does not exist")

    async def info(self, bucket: str, name: str) -> ObjectInfo | None:
        """The object's generation, size and custom metadata; ``None`` when it does not exist.

        Raises:
            RequestRefused: Cloud Storage refuses the name (400).
            TransientError: any other failure.
        """
        check_object_name(bucket, name)
        url = self._endpoint + _object_path(bucket, name)
        try:
            async with self._http().get(url, headers=await self._headers()) as resp:
                if resp.status == 404:
                    return None
                body = await _text(resp)
                _raise_if_refused(resp.status, f"gs://{bucket}/{name}", body)
                if resp.status != 200:
                    raise TransientError(
                        f"Cloud Storage answered {resp.status} reading gs://{bucket}/{name} metadata: {body[:200]}"
                    )
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"Cloud Storage unreachable reading gs://{bucket}/{name}: {err!r}") from err
        return _object_info(json.loads(body))

    async def delete(self, bucket: str, name: str) -> bool:
        """Delete the object's live generation; ``False`` when there was none.

        Raises:
            RequestRefused: Cloud Storage refuses the name (400).
            TransientError: Cloud Storage failed or was unreachable.
        """
        check_object_name(bucket, name)
        url = self._endpoint + _object_path(bucket, name)
        try:
            async with self._http().delete(url, headers=await self._headers()) as resp:
                if resp.status == 404:
                    return False
                if resp.status not in (200, 204):
                    body = await _text(resp)
                    _raise_if_refused(resp.status, f"gs://{bucket}/{name}", body)
                    raise TransientError(f"Cloud Storage answered {resp.status} deleting gs://{bucket}/{name}: {body[:200]}")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"Cloud Storage unreachable deleting gs://{bucket}/{name}: {err!r}") from err
        return True

    # -- writes --------------------------------------------------------------------------
    async def write(
        self,
        bucket: str,
        name: str,
        payload: bytes,
        *,
        content_type: str = "application/json",
        metadata: Mapping[str, str] | None = None,
        if_generation_match: int | None = None,
    ) -> ObjectInfo:
        """Write one object in one request; ``if_generation_match=0`` means "only if absent".

        Raises:
            PreconditionFailed: the object's generation is not ``if_generation_match``.
            RequestRefused: the request breaks one of Cloud Storage's limits (checked here
                first) or Cloud Storage answered 400: the same write can never succeed.
            TransientError: any other failure (a result that cannot be written is retried).
        """
        check_object_name(bucket, name)
        check_custom_metadata(bucket, name, metadata or {})
        resource: dict[str, Any] = {"name": name, "contentType": content_type}
        if metadata:
            resource["metadata"] = dict(metadata)
        boundary = uuid.uuid4().hex
        body = b"".join((
            f"--{boundary}\r\ncontent-type: application/json; charset=UTF-8\r\n\r\n".encode(),
            json.dumps(resource).encode(),
            f"\r\n--{boundary}\r\ncontent-type: {content_type}\r\n\r\n".encode(),
            payload,
            f"\r\n--{boundary}--\r\n".encode(),
        ))  # fmt: skip
        params = {"uploadType": "multipart"}
        if if_generation_match is not None:
            params["ifGenerationMatch"] = str(if_generation_match)
        url = f"{self._endpoint}/upload/storage/v1/b/{quote(bucket, safe='')}/o"
        headers = {**await self._headers(), "content-type": f"multipart/related; boundary={boundary}"}
        where = f"gs://{bucket}/{name}"
        try:
            async with self._http().post(url, params=params, data=body, headers=headers) as resp:
                text = await _text(resp)
                if resp.status == 412:
                    raise PreconditionFailed(f"{where} changed (ifGenerationMatch={if_generation_match})")
                _raise_if_refused(resp.status, where, text)
                if resp.status != 200:
                    raise TransientError(f"Cloud Storage answered {resp.status} writing {where}: {text[:200]}")
        except (aiohttp.ClientError, TimeoutError) as err:
            raise TransientError(f"Cloud Storage unreachable writing {where}: {err!r}") from err
        return _object_info(json.loads(text))


def _fresh(creds: Any) -> bool:
    # google-auth keeps ``expiry`` as a naive datetime in UTC.
    expiry = getattr(creds, "expiry", None)
    if not creds.token:
        return False
    return expiry is None or expiry.replace(tzinfo=UTC).timestamp() - time.time() > _TOKEN_MARGIN_S


def _object_info(resource: Mapping[str, Any]) -> ObjectInfo:
    return ObjectInfo(
        generation=int(resource["generation"]),
        size=int(resource.get("size") or 0),
        metadata=dict(resource.get("metadata") or {}),
    )


async def _text(resp: aiohttp.ClientResponse) -> str:
    return (await resp.read()).decode("utf-8", errors="replace")


def _raise_if_refused(status: int, where: str, body: str) -> None:
    """A 400 is Cloud Storage refusing the request itself: permanent, never retried."""
    if status == 400:
        raise RequestRefused(f"Cloud Storage refused {where} (400): {body[:200]}")


def _raise_for_read(status: int, uri: GcsUri, body: str) -> None:
    if status == 200:
        return
    if status == 403:
        raise PermanentError(ErrorReason.ACCESS_DENIED, f"the service may not read {uri}: {body[:200]}")
    _raise_if_refused(status, str(uri), body)
    raise TransientError(f"Cloud Storage answered {status} reading {uri}: {body[:200]}")


async def _read_limited(resp: aiohttp.ClientResponse, uri: GcsUri, max_bytes: int) -> bytes:
    """The body, stopping as soon as it passes ``max_bytes`` (no length header to trust)."""
    if resp.content_length is not None:
        return await resp.read()
    chunks, size = [], 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            raise PermanentError(ErrorReason.IMAGE_TOO_LARGE, f"{uri} is over the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
