"""Cloud Storage's documented request limits, and how the client classes a refusal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest
from aiohttp import web

from shared.errors import ErrorReason, PermanentError, TransientError
from shared.gcs import GcsClient
from shared.gcs_limits import (
    MAX_CUSTOM_METADATA_BYTES,
    MAX_OBJECT_NAME_BYTES,
    RequestRefused,
    check_custom_metadata,
    check_object_name,
    object_name_problem,
)
from shared.uris import GcsUri

T = TypeVar("T")


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "a" * MAX_OBJECT_NAME_BYTES,
        "é" * (MAX_OBJECT_NAME_BYTES // 2),  # 2 bytes each: exactly 1024 bytes
        "a/../b",  # only a whole name of . or .. is refused
        "...",
        "%2E%2E/x.jpg",
        "tab\tand space ok",
        ".well-known/other",
    ],
)
def test_cloud_storage_accepts_these_names(name: str) -> None:
    assert object_name_problem(name) is None
    check_object_name("b", name)


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        ("a" * (MAX_OBJECT_NAME_BYTES + 1), "1025 bytes of UTF-8, over the limit of 1024"),
        ("€" * 342, "1026 bytes of UTF-8"),  # 342 characters, 3 bytes each
        ("line\nfeed", "carriage return or line feed"),
        ("carriage\rreturn", "carriage return or line feed"),
        (".", "names no object"),
        ("..", "names no object"),
        (".well-known/acme-challenge/token", "reserved prefix"),
        ("lone \udcff surrogate", "not valid UTF-8"),
    ],
)
def test_cloud_storage_refuses_these_names_and_the_check_says_why(name: str, problem: str) -> None:
    found = object_name_problem(name)
    assert found is not None and problem in found

    with pytest.raises(RequestRefused) as info:
        check_object_name("results", name)

    assert info.value.status == 400
    assert info.value.reason is ErrorReason.INVALID_URI
    assert "results" in info.value.message and problem in info.value.message


def test_a_refusal_is_permanent_never_transient() -> None:
    refused = RequestRefused("x")
    assert isinstance(refused, PermanentError) and not isinstance(refused, TransientError)


def test_custom_metadata_counts_keys_and_values_up_to_8_kib() -> None:
    key = "k" * 100
    check_custom_metadata("b", "o", {key: "v" * (MAX_CUSTOM_METADATA_BYTES - 100)})

    with pytest.raises(RequestRefused, match="8193 bytes of custom metadata"):
        check_custom_metadata("b", "o", {key: "v" * (MAX_CUSTOM_METADATA_BYTES - 99)})


# -- the client: checked before sending, and a 400 from Cloud Storage classed the same way -----


def _run(work: Callable[[GcsClient], Awaitable[T]], endpoint: str) -> T:
    async def run() -> T:
        gcs = GcsClient(endpoint, None, timeout_s=5)
        try:
            return await work(gcs)
        finally:
            await gcs.close()

    return asyncio.run(run())


# Nothing listens on port 9 (discard): a request that were sent would fail as TransientError.
_NOWHERE = "http://127.0.0.1:9"
_LONG = "x" * (MAX_OBJECT_NAME_BYTES + 1)


@pytest.mark.parametrize(
    "call",
    [
        lambda gcs: gcs.write("results", _LONG, b"{}"),
        lambda gcs: gcs.info("results", _LONG),
        lambda gcs: gcs.delete("results", _LONG),
        lambda gcs: gcs.read(GcsUri("images", _LONG), None, 100),
        lambda gcs: gcs.write("results", "ok.json", b"{}", metadata={"k": "v" * MAX_CUSTOM_METADATA_BYTES}),
    ],
    ids=["write", "info", "delete", "read", "metadata"],
)
def test_the_client_refuses_what_cloud_storage_refuses_without_sending_it(call) -> None:  # noqa: ANN001
    with pytest.raises(RequestRefused) as info:
        _run(call, _NOWHERE)
    assert info.value.status == 400


class _Answering:
    """A local HTTP server that answers every request with one status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = {"error": {"code": self.status, "message": "The specified object name is not valid."}}
        return web.json_response(body, status=self.status)


async def _serve(answering: _Answering) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answering.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _against(status: int, work: Callable[[GcsClient], Awaitable[object]]) -> tuple[BaseException, int]:
    answering = _Answering(status)

    async def run() -> BaseException:
        servers = _serve(answering)
        endpoint = await anext(servers)
        gcs = GcsClient(endpoint, None, timeout_s=5)
        try:
            await work(gcs)
        except Exception as err:  # noqa: BLE001 - the test inspects it
            return err
        finally:
            await gcs.close()
            await servers.aclose()
        raise AssertionError("no error raised")

    return asyncio.run(run()), answering.requests


@pytest.mark.parametrize(
    "call",
    [
        lambda gcs: gcs.write("results", "r.json", b"{}"),
        lambda gcs: gcs.info("results", "r.json"),
        lambda gcs: gcs.delete("results", "r.json"),
        lambda gcs: gcs.read(GcsUri("images", "cat.jpg"), None, 100),
    ],
    ids=["write", "info", "delete", "read"],
)
def test_a_400_from_cloud_storage_is_a_permanent_refusal_and_a_503_stays_transient(call) -> None:  # noqa: ANN001
    refused, sent = _against(400, call)
    assert isinstance(refused, RequestRefused) and sent == 1
    assert refused.reason is ErrorReason.INVALID_URI and "400" in refused.message

    unavailable, _ = _against(503, call)
    assert isinstance(unavailable, TransientError)
