"""An Open Inference Protocol call whose binary tensor data is run as it arrives.

Read whole, a call with 100 images of 1 MiB held its 100 MiB body, then 100 decoded
tensors, until its last image was answered: four such calls at once took an ingress
replica 260 to 440 MB past idle. Streamed, a call reads one element at a time
(:class:`~serve.http.body_stream.BodyStream`), decodes it, and sends its images to the
model in parts of a few images, with at most :data:`PARTS_IN_FLIGHT` parts at the model:
it holds :func:`streamed_hold` bytes, whatever its body's size, and its first images are
at the model while the rest are still on the wire.

A call is still answered as a whole: the first element that fails (too large, not an
image, an error from the model) answers it, and the rest of its body is not read.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from serve.http import oip
from serve.http.body_stream import BodyStream
from serve.http.oip_checks import check_outcomes
from serve.model.answers import Rejection, Retry
from serve.model.batch import BatchItem, ItemOutcome, model_input_shape
from serve.model.signature import ModelSignature
from shared.errors import ErrorReason

Outcome = ItemOutcome | Rejection | Retry

# Parts of a call at the model at once: one being inferred while the next waits in its queue.
PARTS_IN_FLIGHT = 2
# Decoded tensors of one call in its parts (at the model and being filled), at most;
# a part has at least one image.
PART_TENSOR_BYTES = 12 * 1024 * 1024
# Encoded elements read and not yet decoded, per call (at least one element, whatever its size).
RAW_ELEMENT_BYTES = 8 * 1024 * 1024


def item_bytes(sig: ModelSignature) -> int:
    """One image's tensor in the model's input shape and dtype."""
    return int(np.prod(model_input_shape(sig.input))) * np.dtype(sig.input.dtype).itemsize


def part_images(sig: ModelSignature) -> int:
    """Images per part: a share of :data:`PART_TENSOR_BYTES`, at most one batch of the model."""
    share = PART_TENSOR_BYTES // ((PARTS_IN_FLIGHT + 1) * item_bytes(sig))
    return max(1, min(sig.max_batch_size, share))


def streamed_hold(sig: ModelSignature, max_element: int) -> int:
    """The most bytes a streamed call to ``sig``'s model holds: its parts and its unread elements."""
    parts = (PARTS_IN_FLIGHT + 1) * part_images(sig) * item_bytes(sig)
    return parts + max(RAW_ELEMENT_BYTES, max_element)


async def elements(
    body: BodyStream,
    tensor: oip.InputTensor,
    max_element: int,
    room_for: Callable[[int], Awaitable[None]] | None = None,
) -> AsyncIterator[bytes]:
    """``tensor``'s elements as they arrive: ``BYTES`` by their length prefix, other types a row each.

    ``room_for(size)`` is awaited before an element of ``size`` bytes is read.

    Raises:
        ProtocolError: an element over ``max_element`` bytes (before it is read), or
            binary data that does not hold the shape's elements.
    """
    name, count = tensor.name, tensor.shape[0] if tensor.shape else 1
    left = tensor.binary_size or 0
    if tensor.datatype != oip.BYTES:
        row = left // count if count else 0
        for _ in range(count):
            if room_for is not None:
                await room_for(row)
            yield await body.read(row)
        return
    for i in range(tensor.count):
        if left < 4:
            raise oip.ProtocolError(
                f"input {name!r}: binary BYTES data ends inside element {i}'s length"
            )
        (length,) = struct.unpack("<I", await body.read(4))
        left -= 4
        if length > left:
            raise oip.ProtocolError(f"input {name!r}: binary BYTES element {i} runs past the data")
        if length > max_element:
            raise oip.ProtocolError(
                f"input {name!r} element {i}: {length} bytes, limit {max_element}",
                400, ErrorReason.IMAGE_TOO_LARGE.value,
            )  # fmt: skip
        left -= length
        if room_for is not None:
            await room_for(length)
        yield await body.read(length)
    if left:
        raise oip.ProtocolError(
            f"input {name!r}: binary data holds more than the shape's {tensor.count} elements"
        )


async def run_streamed(
    body: BodyStream,
    tensor: oip.InputTensor,
    sig: ModelSignature,
    max_element: int,
    decode: Callable[[int, bytes], Awaitable[BatchItem]],
    infer: Callable[[list[BatchItem]], Awaitable[list[Outcome]]],
) -> list[ItemOutcome]:
    """Every image's outcome, in order; the first failure is raised as the call's answer.

    ``decode(index, element)`` makes an element a :class:`BatchItem` (raising
    :class:`~serve.http.oip.ProtocolError` for a bad one); ``infer`` runs a part.
    """
    size = part_images(sig)
    decoding: list[asyncio.Task[BatchItem]] = []
    parts: deque[asyncio.Task[list[ItemOutcome]]] = deque()
    outcomes: list[ItemOutcome] = []
    raw = _RawWindow(max(RAW_ELEMENT_BYTES, max_element))
    at_model = asyncio.Semaphore(PARTS_IN_FLIGHT)
    first = 0

    async def part(index: int, images: list[asyncio.Task[BatchItem]]) -> list[ItemOutcome]:
        items = list(await asyncio.gather(*images))
        async with at_model:
            return check_outcomes(await infer(items), index)

    try:
        async for i, element in _numbered(elements(body, tensor, max_element, raw.room_for)):
            decoding.append(raw.track(asyncio.ensure_future(decode(i, element)), len(element)))
            if len(decoding) == size:
                parts.append(asyncio.ensure_future(part(first, decoding)))
                first, decoding = i + 1, []
            while len(parts) > PARTS_IN_FLIGHT or (parts and parts[0].done()):
                outcomes += await parts.popleft()
        await body.expect_end(f"input {tensor.name!r}")
        if decoding:
            parts.append(asyncio.ensure_future(part(first, decoding)))
            decoding = []
        while parts:
            outcomes += await parts.popleft()
        return outcomes
    finally:
        # On a failure, nothing of the call's goes on.
        left = [*decoding, *parts]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


class _RawWindow:
    """Encoded bytes read and not yet decoded, bounded (one element is always let in)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0
        self._freed = asyncio.Event()

    async def room_for(self, size: int) -> None:
        while self._held and self._held + size > self._limit:
            self._freed.clear()
            await self._freed.wait()

    def track(self, task: asyncio.Task[BatchItem], size: int) -> asyncio.Task[BatchItem]:
        self._held += size

        def release(_: asyncio.Task[BatchItem]) -> None:
            self._held -= size
            self._freed.set()

        task.add_done_callback(release)
        return task


async def _numbered(source: AsyncIterator[bytes]) -> AsyncIterator[tuple[int, bytes]]:
    i = 0
    async for element in source:
        yield i, element
        i += 1


__all__ = [
    "PARTS_IN_FLIGHT", "PART_TENSOR_BYTES", "RAW_ELEMENT_BYTES",
    "elements", "item_bytes", "part_images", "run_streamed", "streamed_hold",
]  # fmt: skip
