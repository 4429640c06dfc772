"""A request body read in exact pieces as it arrives, inflated on the way when compressed.

An Open Inference Protocol call with binary tensor data is a small JSON header and
up to 128 MiB of tensor bytes. Read whole, every concurrent call holds its body
(and, compressed, its inflated copy) until it is answered. :class:`BodyStream` hands
out the bytes as they are needed instead: the header, then each element's length,
then the element, so the caller holds only the pieces it is working on.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator

from serve.http.oip import ProtocolError

# Inflated bytes produced per step at most: a compressed chunk that inflates to
# gigabytes is taken in steps of this size, never whole.
INFLATE_STEP = 1 << 20
# Consumed bytes at the buffer's front are dropped once there are this many.
_COMPACT_AT = 1 << 20


class BodyStream:
    """Exact reads from ``chunks`` (a request body), never past ``limit`` payload bytes.

    ``declared`` is the body's ``Content-Length`` when it gave one: a body that runs
    past it, or ends short of it, is refused. ``encoding`` is its ``Content-Encoding``
    (``identity``, ``gzip`` or ``deflate``); a compressed body is inflated step by step
    and ``limit`` applies to what it inflates to.

    Raises (from every read):
        ProtocolError: 400 for a body that ends early or is not what it declares,
            413 past ``limit``, 415 for another encoding (from the constructor).
    """

    def __init__(
        self, chunks: AsyncIterator[bytes], *, declared: int | None, encoding: str | None, limit: int
    ) -> None:
        name = (encoding or "identity").strip().lower()
        if name in ("", "identity"):
            self._inflater = None
        elif name in ("gzip", "deflate"):
            self._inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if name == "gzip" else zlib.MAX_WBITS)
        else:
            raise ProtocolError(f"unsupported Content-Encoding {encoding!r} (gzip, deflate)", 415)
        self._encoding = name
        self._chunks = chunks
        self._declared = declared
        self._limit = limit
        self._buffer = bytearray()
        self._start = 0
        self._received = 0  # bytes of the body as sent
        self._payload = 0  # bytes after inflating
        self._pending = b""  # compressed bytes not yet inflated
        self._ended = False

    @property
    def position(self) -> int:
        """Payload bytes handed out so far."""
        return self._payload - (len(self._buffer) - self._start)

    async def read(self, size: int) -> bytes:
        """The next ``size`` payload bytes."""
        while len(self._buffer) - self._start < size:
            if not await self._pull():
                have = len(self._buffer) - self._start
                raise ProtocolError(
                    f"body ended after {self.position + have} bytes, {size - have} short of the "
                    f"{size} bytes expected at offset {self.position}"
                )
        out = bytes(self._buffer[self._start : self._start + size])
        self._start += size
        if self._start >= _COMPACT_AT:
            del self._buffer[: self._start]
            self._start = 0
        return out

    async def expect_end(self, what: str = "the request") -> None:
        """Check that the body ends here: nothing left after ``what``, and it is whole."""
        if len(self._buffer) - self._start or await self._pull():
            raise ProtocolError(f"the body has bytes after {what}, at offset {self.position}")

    async def _pull(self) -> bool:
        """Add payload bytes to the buffer; ``False`` at the body's end."""
        while True:
            if self._inflater is not None and (self._pending or self._inflater.unconsumed_tail):
                pending = self._inflater.unconsumed_tail or self._pending
                self._pending = b""
                try:
                    out = self._inflater.decompress(pending, INFLATE_STEP)
                except zlib.error as err:
                    raise ProtocolError(f"body is not valid {self._encoding} data: {err}") from err
                if self._inflater.eof and (self._inflater.unused_data or self._inflater.unconsumed_tail):
                    raise ProtocolError(f"body has bytes after the end of its {self._encoding} data")
                if out:
                    self._add(out)
                    return True
                continue
            if self._ended:
                return False
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self._finish()
                return False
            if not chunk:
                continue
            self._received += len(chunk)
            if self._declared is not None and self._received > self._declared:
                raise ProtocolError(f"body is longer than its Content-Length {self._declared}")
            if self._inflater is None:
                self._add(chunk)
                return True
            self._pending = chunk

    def _add(self, data: bytes) -> None:
        self._payload += len(data)
        if self._payload > self._limit:
            what = "decompressed body" if self._inflater is not None else "body"
            raise ProtocolError(f"{what} is over the limit of {self._limit} bytes", 413, "too_large")
        self._buffer += data

    def _finish(self) -> None:
        self._ended = True
        if self._declared is not None and self._received != self._declared:
            raise ProtocolError(
                f"body ended after {self._received} of its {self._declared} declared bytes"
            )
        if self._inflater is not None and not self._inflater.eof:
            raise ProtocolError(f"body is truncated {self._encoding} data")


__all__ = ["INFLATE_STEP", "BodyStream"]
