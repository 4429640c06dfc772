"""BodyStream: exact reads from a request body as it arrives, inflated in bounded steps."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import AsyncIterator

import pytest

from serve.http.body_stream import INFLATE_STEP, BodyStream
from serve.http.oip import ProtocolError


async def _chunks(parts: list[bytes], pulled: list[int] | None = None) -> AsyncIterator[bytes]:
    for part in parts:
        if pulled is not None:
            pulled.append(len(part))
        yield part


def _read_all(stream: BodyStream, sizes: list[int]) -> list[bytes]:
    async def run() -> list[bytes]:
        out = [await stream.read(n) for n in sizes]
        await stream.expect_end()
        return out

    return asyncio.run(run())


def test_reads_are_exact_across_chunk_boundaries() -> None:
    body = bytes(range(256)) * 4
    stream = BodyStream(_chunks([body[:3], b"", body[3:700], body[700:]]), declared=len(body), encoding=None, limit=10**6)

    pieces = _read_all(stream, [1, 4, 600, 419])

    assert b"".join(pieces) == body and [len(p) for p in pieces] == [1, 4, 600, 419]
    assert stream.position == len(body)


def test_a_body_is_pulled_only_as_far_as_it_is_read() -> None:
    pulled: list[int] = []
    stream = BodyStream(_chunks([b"a" * 10] * 100, pulled), declared=None, encoding=None, limit=10**6)

    assert asyncio.run(stream.read(25)) == b"a" * 25

    assert len(pulled) == 3


@pytest.mark.parametrize(
    ("parts", "declared", "message"),
    [
        ([b"abcd", b"ef"], 4, "longer than its Content-Length 4"),
        ([b"ab"], 4, "ended after 2 of its 4 declared bytes"),
        ([b"abcdef", b"g"], None, "the body has bytes after the request"),
    ],
    ids=["longer-than-declared", "shorter-than-declared", "trailing-bytes"],
)
def test_a_body_that_is_not_what_it_declares_is_a_400(parts: list[bytes], declared: int | None, message: str) -> None:
    stream = BodyStream(_chunks(parts), declared=declared, encoding=None, limit=100)

    with pytest.raises(ProtocolError, match=message) as raised:
        _read_all(stream, [4])

    assert raised.value.status == 400


def test_a_read_past_the_end_names_the_offset() -> None:
    stream = BodyStream(_chunks([b"abc"]), declared=None, encoding=None, limit=100)

    with pytest.raises(ProtocolError, match="body ended after 3 bytes, 2 short of the 5 bytes expected at offset 0"):
        asyncio.run(stream.read(5))


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compressed_body_is_inflated_on_the_way(encoding: str) -> None:
    payload = b"header" + bytes(range(256)) * 20_000
    data = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    parts = [data[i : i + 1000] for i in range(0, len(data), 1000)]
    stream = BodyStream(_chunks(parts), declared=len(data), encoding=encoding, limit=len(payload))

    pieces = _read_all(stream, [6, len(payload) - 6])

    assert b"".join(pieces) == payload


def test_a_body_that_inflates_past_the_limit_is_a_413_before_it_is_inflated_whole() -> None:
    bomb = gzip.compress(b"\0" * (200 * 1024 * 1024))  # 200 MiB of zeros in about 200 KB
    stream = BodyStream(_chunks([bomb]), declared=len(bomb), encoding="gzip", limit=10 * 1024 * 1024)

    async def run() -> None:
        while True:
            await stream.read(1 << 20)

    with pytest.raises(ProtocolError, match="decompressed body is over the limit of 10485760 bytes") as raised:
        asyncio.run(run())

    assert raised.value.status == 413
    assert stream.position <= 10 * 1024 * 1024 + INFLATE_STEP


def test_truncated_or_corrupt_compressed_data_is_a_400() -> None:
    data = gzip.compress(b"x" * 10_000)
    truncated = BodyStream(_chunks([data[:-8]]), declared=None, encoding="gzip", limit=10**6)
    corrupt = BodyStream(_chunks([b"not gzip at all"]), declared=None, encoding="gzip", limit=10**6)

    with pytest.raises(ProtocolError, match="truncated gzip data"):
        _read_all(truncated, [10_000])
    with pytest.raises(ProtocolError, match="not valid gzip data"):
        _read_all(corrupt, [1])


def test_an_unknown_encoding_is_a_415() -> None:
    with pytest.raises(ProtocolError, match="unsupported Content-Encoding 'br'") as raised:
        BodyStream(_chunks([]), declared=None, encoding="br", limit=1)

    assert raised.value.status == 415
