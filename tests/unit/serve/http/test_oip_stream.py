"""Elements of a streamed input: read one at a time, room asked for before each is read."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from serve.http import oip
from serve.http.body_stream import BodyStream
from serve.http.oip_stream import elements


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _read(tensor: oip.InputTensor, data: bytes, max_element: int = 1000) -> tuple[list[bytes], list[tuple[int, int]]]:
    body = BodyStream(_chunks(data, 7), declared=len(data), encoding=None, limit=10**6)
    asked: list[tuple[int, int]] = []

    async def room_for(size: int) -> None:
        asked.append((size, body.position))

    async def run() -> list[bytes]:
        return [e async for e in elements(body, tensor, max_element, room_for)]

    return asyncio.run(run()), asked


def test_bytes_elements_come_one_at_a_time_with_room_asked_before_each_is_read() -> None:
    values = [b"a" * 10, b"", b"c" * 30]
    data = oip.serialize_bytes(values)

    got, asked = _read(oip.InputTensor("image", "BYTES", (3,), None, len(data)), data)

    assert got == values
    assert asked == [(10, 4), (0, 18), (30, 22)]  # each element's size, at the offset of its bytes


def test_numeric_rows_come_one_at_a_time() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)

    got, asked = _read(oip.InputTensor("input", "FP32", (3, 4), None, rows.nbytes), rows.tobytes())

    assert [np.frombuffer(g, np.float32).tolist() for g in got] == rows.tolist()
    assert asked == [(16, 0), (16, 16), (16, 32)]


@pytest.mark.parametrize(
    ("values", "size", "message"),
    [
        ([b"x" * 2000], None, "element 0: 2000 bytes, limit 1000"),
        ([b"ab"], 8, "ends inside element 1's length"),
        ([b"ab", b"cd"], None, "holds more than the shape's 1 elements"),
        ([b"abcdef"], 8, "binary BYTES element 0 runs past the data"),
    ],
    ids=["too-large", "short-length", "extra-element", "runs-past"],
)
def test_bytes_data_that_does_not_fit_the_shape_is_refused(values: list[bytes], size: int | None, message: str) -> None:
    data = oip.serialize_bytes(values)
    count = 2 if message.startswith("ends inside") else 1
    tensor = oip.InputTensor("image", "BYTES", (count,), None, size if size is not None else len(data))
    padded = data + b"\0" * max(0, (size or 0) - len(data))

    with pytest.raises(oip.ProtocolError, match=message):
        _read(tensor, padded)
