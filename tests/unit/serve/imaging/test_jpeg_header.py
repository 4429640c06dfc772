"""JPEG headers read from the bytes: size, components, scan type, EXIF orientation."""

from __future__ import annotations

import io
import struct

import pytest
from PIL import Image

from serve.imaging.jpeg_header import read_jpeg_header


def _jpeg(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_size_and_components_of_a_baseline_jpeg() -> None:
    header = read_jpeg_header(_jpeg(Image.new("RGB", (321, 123), (1, 2, 3))))
    assert header is not None
    assert (header.width, header.height, header.components, header.precision) == (321, 123, 3, 8)
    assert not header.progressive and header.huffman_dct and header.for_gpu
    assert header.orientation == 1 and header.upright_size == (321, 123)


def test_progressive_grey_and_cmyk() -> None:
    progressive = read_jpeg_header(_jpeg(Image.new("RGB", (40, 30)), progressive=True))
    assert progressive is not None and progressive.progressive and progressive.for_gpu
    grey = read_jpeg_header(_jpeg(Image.new("L", (40, 30))))
    assert grey is not None and grey.components == 1 and grey.for_gpu
    cmyk = read_jpeg_header(_jpeg(Image.new("CMYK", (40, 30))))
    assert cmyk is not None and cmyk.components == 4 and not cmyk.for_gpu


def _exif(orientation: int, order: str) -> bytes:
    """An APP1 EXIF payload with a make tag then the orientation tag, in byte order ``order``."""
    e = "<" if order == "II" else ">"
    entries = [(0x010F, 2, 4, b"cam\x00"), (0x0112, 3, 1, struct.pack(e + "HH", orientation, 0))]
    ifd = struct.pack(e + "H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack(e + "HHI", tag, kind, count) + value
    return b"Exif\x00\x00" + order.encode() + struct.pack(e + "HI", 42, 8) + ifd + b"\x00" * 4


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("order", ["II", "MM"])
def test_exif_orientation_in_either_byte_order(orientation: int, order: str) -> None:
    header = read_jpeg_header(_jpeg(Image.new("RGB", (50, 20)), exif=_exif(orientation, order)))
    assert header is not None and header.orientation == orientation
    assert header.upright_size == ((20, 50) if orientation >= 5 else (50, 20))
    with Image.open(
        io.BytesIO(_jpeg(Image.new("RGB", (50, 20)), exif=_exif(orientation, order)))
    ) as im:
        assert im.getexif()[0x0112] == orientation  # Pillow reads the same tag


@pytest.mark.parametrize(
    "data",
    [b"", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"\xff\xd8\xff\xe0\x00", b"\xff\xd8" + b"\x00" * 20],
)
def test_what_is_not_a_readable_jpeg_header_is_left_to_the_cpu_decoder(data: bytes) -> None:
    assert read_jpeg_header(data) is None


def test_a_truncated_jpeg_keeps_its_header() -> None:
    data = _jpeg(Image.new("RGB", (64, 48)))
    header = read_jpeg_header(data[:400])
    assert header is not None and (header.width, header.height) == (64, 48)
