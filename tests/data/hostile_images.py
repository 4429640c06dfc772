"""Hostile image payloads, built from a sample photo so that no binary blob is committed.

Each entry names what triggerfish must conclude about the bytes: ``"ok"`` (a correct
result) or the ``error.reason`` of the typed error record. The EXIF cases are IFDs
that make Pillow raise outside its documented exceptions (``AttributeError``,
``struct.error``, a negative seek) while it reads or rewrites the orientation.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parents[2] / "infra" / "samples" / "cat.jpg"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ORIENTATION, MAKE, EXIF_IFD, JPEG_OFFSET = 0x0112, 0x010F, 0x8769, 0x0201
SHORT, RATIONAL, UNDEFINED, FLOAT, DOUBLE = 3, 5, 7, 11, 12


@cache
def _small() -> Image.Image:
    with Image.open(SAMPLE) as photo:
        return photo.convert("RGB").resize((64, 48))


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, bit_depth: int = 8, idat: bytes | None = None) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 2, 0, 0, 0)
    data = idat if idat is not None else zlib.compress(b"\x00" * 64)
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _png_bytes() -> bytearray:
    return bytearray(_encode(_small(), "PNG"))


def _png_bad_header_crc() -> bytes:
    data = _png_bytes()
    data[29:33] = b"\x00\x00\x00\x00"  # IHDR's CRC
    return bytes(data)


def _png_bad_idat_crc() -> bytes:
    data = _png_bytes()
    at = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[at - 4 : at])
    data[at + 4 + length : at + 8 + length] = b"\xde\xad\xbe\xef"
    return bytes(data)


def _png_garbage_idat() -> bytes:
    data = _png_bytes()
    at = data.index(b"IDAT")
    data[at + 4 : at + 24] = b"\x00" * 20
    return bytes(data)


def _png_broken_chunk_mid_stream() -> bytes:
    """Image data split over two IDAT chunks, the second with an invalid type (Pillow: SyntaxError)."""
    image = _small()
    width, height = image.size
    raw = image.tobytes()
    rows = b"".join(b"\x00" + raw[y * width * 3 : (y + 1) * width * 3] for y in range(height))
    packed = zlib.compress(rows)
    half = len(packed) // 2
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    broken = struct.pack(">I", len(packed) - half) + b"I\xffAT" + packed[half:] + b"\x00" * 4
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", packed[:half])
        + broken
        + _chunk(b"IEND", b"")
    )


def _png_without_end() -> bytes:
    data = _png_bytes()
    return bytes(data[: data.index(b"IEND") - 4])


def _png_16bit_gray() -> bytes:
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    return _encode(Image.fromarray(ramp), "PNG")


def _png_16bit_rgb() -> bytes:
    rows = b"".join(b"\x00" + b"\x12\x34" * 12 for _ in range(4))
    return png_declaring(4, 4, bit_depth=16, idat=zlib.compress(rows))


def _animated_gif() -> bytes:
    frames = [_small().rotate(angle) for angle in range(0, 360, 30)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], loop=0)
    return buffer.getvalue()


def _exif_jpeg(
    entries: list[tuple[int, int, int, int]], tail: bytes = b"", ifd_offset: int = 8
) -> bytes:
    """A JPEG with a little-endian EXIF block: one IFD of ``(tag, type, count, value)``."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHII", tag, kind, count, value)
    exif = (
        b"Exif\x00\x00II*\x00" + struct.pack("<I", ifd_offset) + ifd + struct.pack("<I", 0) + tail
    )
    return _encode(_small(), "JPEG", exif=exif)


def _noise(size: int) -> bytes:
    return np.random.default_rng(8).integers(0, 256, size, dtype=np.uint8).tobytes()


# kind -> (object name suffix, builder, expected outcome)
IMAGES: dict[str, tuple[str, Callable[[], bytes], str]] = {
    "truncated_jpeg": (
        ".jpg",
        lambda: SAMPLE.read_bytes()[: len(SAMPLE.read_bytes()) // 2],
        "not_an_image",
    ),
    "jpeg_header_only": (".jpg", lambda: SAMPLE.read_bytes()[:200], "not_an_image"),
    "png_broken_chunk_mid_stream": (".png", _png_broken_chunk_mid_stream, "not_an_image"),
    "png_bad_header_crc": (".png", _png_bad_header_crc, "not_an_image"),
    "png_garbage_image_data": (".png", _png_garbage_idat, "not_an_image"),
    "png_bad_data_crc": (".png", _png_bad_idat_crc, "ok"),
    "png_without_end_chunk": (".png", _png_without_end, "ok"),
    "png_zero_width": (".png", lambda: png_declaring(0, 10), "not_an_image"),
    "gif": (".gif", lambda: _encode(_small(), "GIF"), "ok"),
    "gif_animated": (".gif", _animated_gif, "ok"),
    "webp": (".webp", lambda: _encode(_small(), "WEBP"), "ok"),
    "bmp": (".bmp", lambda: _encode(_small(), "BMP"), "ok"),
    "tiff": (".tif", lambda: _encode(_small(), "TIFF"), "ok"),
    "one_pixel": (".png", lambda: _encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"), "ok"),
    "cmyk_jpeg": (".jpg", lambda: _encode(_small().convert("CMYK"), "JPEG"), "ok"),
    "png_16bit_gray": (".png", _png_16bit_gray, "ok"),
    "png_16bit_rgb": (".png", _png_16bit_rgb, "ok"),
    "png_gray_alpha": (".png", lambda: _encode(_small().convert("LA"), "PNG"), "ok"),
    "png_palette": (".png", lambda: _encode(_small().convert("P"), "PNG"), "ok"),
    # 900 MP declared in 69 bytes: Pillow's own bomb guard fires in open().
    "bomb_png_30000x30000": (".png", lambda: png_declaring(30000, 30000), "image_too_large"),
    # 64 MP: under Pillow's guard, over TRIGGERFISH_MAX_IMAGE_PIXELS (60 MP).
    "bomb_png_8000x8000": (".png", lambda: png_declaring(8000, 8000), "image_too_large"),
    "exif_orientation_rotated": (".jpg", lambda: _exif_jpeg([(ORIENTATION, SHORT, 1, 6)]), "ok"),
    "exif_orientation_65535": (".jpg", lambda: _exif_jpeg([(ORIENTATION, SHORT, 1, 0xFFFF)]), "ok"),
    "exif_orientation_count_bomb": (
        ".jpg",
        lambda: _exif_jpeg([(ORIENTATION, SHORT, 0x3FFFFFFF, 64)]),
        "ok",
    ),
    "exif_ifd_offset_past_end": (".jpg", lambda: _exif_jpeg([], ifd_offset=0x7FFFFFF0), "ok"),
    "exif_3000_orientation_tags": (
        ".jpg",
        lambda: _exif_jpeg([(ORIENTATION, SHORT, 1, 6)] * 3000),
        "ok",
    ),
    "exif_float_make": (
        ".jpg",
        lambda: _exif_jpeg([(MAKE, FLOAT, 1, 0), (ORIENTATION, SHORT, 1, 6)]),
        "not_an_image",
    ),
    "exif_rational_make": (
        ".jpg",
        lambda: _exif_jpeg(
            [(MAKE, RATIONAL, 1, 26), (ORIENTATION, SHORT, 1, 6)], tail=b"\x01\0\0\0\x01\0\0\0"
        ),
        "not_an_image",
    ),
    "exif_struct_error": (
        ".jpg",
        lambda: _exif_jpeg([(JPEG_OFFSET, RATIONAL, 4, 0), (ORIENTATION, SHORT, 1, 3)]),
        "not_an_image",
    ),
    "exif_negative_seek": (
        ".jpg",
        lambda: _exif_jpeg([(EXIF_IFD, 9, 2, 8), (ORIENTATION, SHORT, 1, 3)]),
        "not_an_image",
    ),
    "zero_bytes": (".jpg", lambda: b"", "not_an_image"),
    "text_named_jpg": (".jpg", lambda: b"just some notes, not a photo\n" * 10, "not_an_image"),
    "html_named_png": (
        ".png",
        lambda: b"<html><body><img src=x onerror=alert(1)></body></html>",
        "not_an_image",
    ),
    "svg_100000px": (
        ".svg",
        lambda: (
            b'<svg xmlns="http://www.w3.org/2000/svg" width="100000" height="100000"><rect width="100%"/></svg>'
        ),
        "not_an_image",
    ),
    "random_noise": (".jpg", lambda: _noise(50_000), "not_an_image"),
}


def noise(size: int) -> bytes:
    """``size`` bytes that no decoder accepts (deterministic)."""
    return _noise(size)
