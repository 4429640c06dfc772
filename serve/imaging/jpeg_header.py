"""What a JPEG's header says, read from the bytes without decoding anything.

The device pipeline must know, before the batch goes to the GPU decoder, each
image's size (for the pixel limit and the region to decode), its EXIF
orientation (the region is decoded in stored coordinates and turned upright on
the device) and whether the GPU decoder can take it at all (CMYK/YCCK and
arithmetic-coded or lossless JPEGs go to the CPU decoder). Pillow would open,
parse and copy the whole file for that; walking the markers up to the frame
header touches a few hundred bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = ["JpegHeader", "read_jpeg_header"]

_SOI = b"\xff\xd8"
# Start-of-frame markers: C0-C3, C5-C7, C9-CB, CD-CF (C4 DHT, C8 JPG, CC DAC are not frames).
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_HUFFMAN_LOSSY = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive; Huffman-coded DCT
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RSTn: no length field
_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class JpegHeader:
    """The frame header of a JPEG, in stored (not yet EXIF-rotated) orientation.

    Attributes:
        width, height: Stored size in pixels.
        components: 1 (grey), 3 (YCbCr/RGB) or 4 (CMYK/YCCK).
        precision: Bits per sample (8 for nearly every photo).
        progressive: Progressive scan order.
        huffman_dct: Huffman-coded DCT (baseline, extended or progressive), what nvJPEG decodes.
        orientation: EXIF orientation 1-8 (1 when absent or unreadable).
    """

    width: int
    height: int
    components: int
    precision: int
    progressive: bool
    huffman_dct: bool
    orientation: int = 1

    @property
    def upright_size(self) -> tuple[int, int]:
        """``(width, height)`` once the EXIF orientation is applied."""
        if self.orientation in (5, 6, 7, 8):
            return self.height, self.width
        return self.width, self.height

    @property
    def for_gpu(self) -> bool:
        """Whether the GPU decoder is expected to take it (it may still refuse)."""
        return self.huffman_dct and self.precision == 8 and self.components in (1, 3)


def read_jpeg_header(data: bytes) -> JpegHeader | None:
    """The header of ``data`` if it is a JPEG with a readable frame header, else None.

    None is not an error verdict: the CPU decoder decides what such bytes are
    (another format, or ``not_an_image``).
    """
    if not data.startswith(_SOI):
        return None
    orientation, pos, end = 1, 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        segment = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(segment) != length - 2:
            return None
        if marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            orientation = _exif_orientation(segment[6:]) or orientation
        elif marker in _SOF:
            if len(segment) < 6:
                return None
            precision, height, width, components = struct.unpack_from(">BHHB", segment)
            if width == 0 or height == 0:
                return None
            return JpegHeader(
                width=width,
                height=height,
                components=components,
                precision=precision,
                progressive=marker in _PROGRESSIVE,
                huffman_dct=marker in _HUFFMAN_LOSSY,
                orientation=orientation,
            )
        elif marker == 0xDA:  # scan data before any frame header
            return None
        pos += 2 + length
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 in a TIFF structure, or None."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    if ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        tag, kind = struct.unpack_from(order + "HH", tiff, entry)
        if tag == _EXIF_ORIENTATION and kind == 3:  # SHORT
            (value,) = struct.unpack_from(order + "H", tiff, entry + 8)
            return value if 1 <= value <= 8 else None
    return None
