"""Decoding and preprocessing on the sample photos and synthetic images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.imaging.cpu_decode import decode_image, prepare_image, to_model_input
from serve.model_config import InputSpec, PreprocessSpec
from shared.errors import ErrorReason, PermanentError

SAMPLES = Path(__file__).resolve().parents[4] / "infra" / "samples"
BIG = 10**9
SPEC = InputSpec(height=224, width=224)


def _sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _corners(geometry: object, h: int, w: int) -> tuple[float, float, float, float]:
    """Model-input corners (0, 0) and (h, w) mapped to relative original coordinates."""
    mapped = geometry.to_relative(  # type: ignore[attr-defined]
        np.array([0.0]), np.array([0.0]), np.array([float(h)]), np.array([float(w)])
    )
    return tuple(float(v[0]) for v in mapped)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    """A 6000x4000 JPEG (24 MP): cheap to store, expensive to decode in full."""
    return _encode(Image.new("RGB", (6000, 4000), (90, 120, 150)), "JPEG")


# --- prepare_image on real photos ------------------------------------------------------


@pytest.mark.parametrize("resize", ["center_crop", "stretch", "letterbox"])
@pytest.mark.parametrize("sample", ["cat.jpg", "coffee.jpg", "text.jpg", "astronaut.jpg"])
def test_every_resize_mode_gives_a_uint8_hwc_tensor_at_model_size(sample: str, resize: str) -> None:
    prepared = prepare_image(_sample(sample), SPEC, PreprocessSpec(resize=resize), BIG)

    assert prepared.pixels.shape == (224, 224, 3)
    assert prepared.pixels.dtype == np.uint8
    assert prepared.pixels.flags["C_CONTIGUOUS"]
    with Image.open(SAMPLES / sample) as original:
        assert (
            prepared.geometry.original_width,
            prepared.geometry.original_height,
        ) == original.size
    assert (prepared.geometry.input_height, prepared.geometry.input_width) == (224, 224)


def test_a_non_square_model_input_is_respected() -> None:
    spec = InputSpec(height=96, width=160, layout="NHWC")

    for resize in ("center_crop", "stretch", "letterbox"):
        prepared = prepare_image(_sample("cat.jpg"), spec, PreprocessSpec(resize=resize), BIG)
        assert prepared.pixels.shape == (96, 160, 3)


def test_stretch_maps_the_model_input_onto_the_whole_image() -> None:
    prepared = prepare_image(_sample("cat.jpg"), SPEC, PreprocessSpec(resize="stretch"), BIG)

    g = prepared.geometry
    assert (g.original_height, g.original_width) == (300, 451)
    assert g.scale_y == pytest.approx(224 / 300)
    assert g.scale_x == pytest.approx(224 / 451)
    assert _corners(g, 224, 224) == pytest.approx((0.0, 0.0, 1.0, 1.0))


def test_center_crop_maps_the_model_input_to_the_central_part_of_the_image() -> None:
    # cat.jpg is 451x300: the short side (300) scales to 224 / 0.875 = 256, the long to 385;
    # the 224x224 crop starts 16 rows and 80 columns in.
    prepared = prepare_image(_sample("cat.jpg"), SPEC, PreprocessSpec(crop_ratio=0.875), BIG)

    ymin, xmin, ymax, xmax = _corners(prepared.geometry, 224, 224)
    assert (ymin, ymax) == pytest.approx((16 / 256, 240 / 256))
    assert (xmin, xmax) == pytest.approx((80 / 385, 304 / 385))
    assert ymax - ymin == pytest.approx(0.875)  # the crop ratio of the short side
    assert xmin + xmax == pytest.approx(1.0, abs=1.01 / 385)  # centred, to the pixel


def test_center_crop_keeps_the_centre_pixels() -> None:
    # Red | green | blue thirds: the crop must keep the green middle, not an edge.
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :100], image[:, 100:200], image[:, 200:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    spec = InputSpec(height=50, width=50)

    prepared = prepare_image(
        _encode(Image.fromarray(image)), spec, PreprocessSpec(crop_ratio=1.0), BIG
    )

    inner = prepared.pixels[:, 2:-2]
    assert (inner[..., 1] == 255).all()
    assert (inner[..., 0] == 0).all() and (inner[..., 2] == 0).all()


def test_letterbox_pads_and_maps_the_image_content_to_its_full_extent() -> None:
    # 400x200 solid image into 100x100: content is 100x50, 25 rows of padding above and below.
    image = Image.new("RGB", (400, 200), (200, 10, 10))
    pre = PreprocessSpec(resize="letterbox", pad_value=7)

    prepared = prepare_image(_encode(image), InputSpec(height=100, width=100), pre, BIG)

    pixels, g = prepared.pixels, prepared.geometry
    assert (pixels[:25] == 7).all() and (pixels[75:] == 7).all()
    assert (pixels[25:75] == (200, 10, 10)).all()
    assert (g.offset_y, g.offset_x) == (25.0, 0.0)
    # The content's corners map to the image's corners ...
    assert _corners(g, 0, 0)[:2] == pytest.approx((0.0, 0.0))
    content = g.to_relative(np.array([25.0]), np.array([0.0]), np.array([75.0]), np.array([100.0]))
    assert [float(v[0]) for v in content] == pytest.approx([0.0, 0.0, 1.0, 1.0])
    # ... while the padded rows lie outside it (clipped when reported).
    assert (0 - g.offset_y) / g.scale_y < 0
    assert (100 - g.offset_y) / g.scale_y > g.original_height
    assert _corners(g, 100, 100) == pytest.approx((0.0, 0.0, 1.0, 1.0))
    assert _corners(g, 10, 100)[2] == 0.0  # a box wholly in the top padding collapses


def test_letterbox_on_a_photo_pads_the_short_side_with_pad_value() -> None:
    # cat.jpg 451x300 -> scale 224/451: content 224x149, 37 padding rows above.
    prepared = prepare_image(_sample("cat.jpg"), SPEC, PreprocessSpec(resize="letterbox"), BIG)

    g = prepared.geometry
    assert g.offset_y == 37.0 and g.offset_x == 0.0
    assert (prepared.pixels[:37] == 114).all()
    assert (prepared.pixels[37 + 149 :] == 114).all()
    content = g.to_relative(np.array([37.0]), np.array([0.0]), np.array([186.0]), np.array([224.0]))
    assert [float(v[0]) for v in content] == pytest.approx([0.0, 0.0, 1.0, 1.0], abs=1e-3)


def test_bgr_swaps_the_channels() -> None:
    rgb = prepare_image(_sample("coffee.jpg"), SPEC, PreprocessSpec(channel_order="RGB"), BIG)
    bgr = prepare_image(_sample("coffee.jpg"), SPEC, PreprocessSpec(channel_order="BGR"), BIG)

    assert not np.array_equal(rgb.pixels, bgr.pixels)
    np.testing.assert_array_equal(bgr.pixels, rgb.pixels[..., ::-1])
    assert bgr.pixels.flags["C_CONTIGUOUS"]


def test_grayscale_and_rgba_images_become_three_channels() -> None:
    for mode, colour in (("L", 77), ("RGBA", (1, 2, 3, 255)), ("P", 5)):
        data = _encode(Image.new(mode, (64, 48), colour))
        prepared = prepare_image(data, InputSpec(height=32, width=32), PreprocessSpec(), BIG)
        assert prepared.pixels.shape == (32, 32, 3)
    gray = prepare_image(
        _encode(Image.new("L", (64, 48), 77)), InputSpec(height=32, width=32), PreprocessSpec(), BIG
    )
    assert (gray.pixels == 77).all()


# --- decode_image ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", b"hello, not an image", b"\x89PNG\r\n\x1a\nbroken"])
def test_bytes_that_are_not_an_image_are_rejected(data: bytes) -> None:
    with pytest.raises(PermanentError) as info:
        prepare_image(data, SPEC, PreprocessSpec(), BIG)

    assert info.value.reason is ErrorReason.NOT_AN_IMAGE
    assert "cannot decode image" in info.value.message


def test_a_truncated_jpeg_is_not_an_image() -> None:
    with pytest.raises(PermanentError) as info:
        decode_image(_sample("cat.jpg")[:2000], (224, 224), BIG)

    assert info.value.reason is ErrorReason.NOT_AN_IMAGE


def test_a_header_declaring_more_than_max_pixels_is_too_large(big_jpeg: bytes) -> None:
    with pytest.raises(PermanentError) as info:
        prepare_image(big_jpeg, SPEC, PreprocessSpec(), max_pixels=1_000_000)

    assert info.value.reason is ErrorReason.IMAGE_TOO_LARGE
    assert "6000x4000 = 24000000 pixels, limit 1000000" in info.value.message


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height``; the pixel data is never read."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_too_large_not_undecodable() -> None:
    # 200 MP is past Pillow's own hard limit, which fires inside Image.open().
    with pytest.raises(PermanentError) as info:
        decode_image(_png_header(20_000, 10_000), (224, 224), max_pixels=60_000_000)

    assert info.value.reason is ErrorReason.IMAGE_TOO_LARGE


def test_jpeg_draft_decoding_reduces_the_decoded_size(big_jpeg: bytes) -> None:
    decoded = decode_image(big_jpeg, (224, 224), BIG)

    assert decoded.mode == "RGB"
    assert decoded.size[0] < 6000 and decoded.size[1] < 4000
    assert decoded.size[0] >= 224 and decoded.size[1] >= 224
    assert decoded.size == (750, 500)  # 1/8 scale


def test_draft_never_decodes_below_the_target(big_jpeg: bytes) -> None:
    decoded = decode_image(big_jpeg, (1200, 1000), BIG)

    assert decoded.size[0] >= 1000 and decoded.size[1] >= 1200
    assert decoded.size[0] < 6000


def test_a_draft_decoded_image_keeps_its_original_geometry(big_jpeg: bytes) -> None:
    prepared = prepare_image(big_jpeg, SPEC, PreprocessSpec(resize="stretch"), BIG)

    g = prepared.geometry
    assert (g.original_height, g.original_width) == (4000, 6000)
    assert g.scale_x == pytest.approx(224 / 6000)
    assert np.abs(prepared.pixels.astype(int) - (90, 120, 150)).max() <= 3


# --- to_model_input --------------------------------------------------------------------


def _batch() -> np.ndarray:
    batch = np.zeros((2, 2, 3, 3), np.uint8)
    batch[..., 0], batch[..., 1], batch[..., 2] = 255, 0, 51
    batch[1] = 128
    return batch


def test_nchw_float_input_applies_scale_mean_and_std() -> None:
    pre = PreprocessSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    spec = InputSpec(height=2, width=3, layout="NCHW")

    out = to_model_input(_batch(), spec, pre)

    assert out.shape == (2, 3, 2, 3) and out.dtype == np.float32
    assert out.flags["C_CONTIGUOUS"]
    mean, std = np.array(pre.mean), np.array(pre.std)
    expected_first = (np.array([255, 0, 51]) / 255 - mean) / std
    expected_second = (128 / 255 - mean) / std
    np.testing.assert_allclose(out[0, :, 1, 2], expected_first, rtol=1e-5)
    np.testing.assert_allclose(out[1, :, 0, 0], expected_second, rtol=1e-5)


def test_nhwc_keeps_the_channel_last() -> None:
    pre = PreprocessSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    spec = InputSpec(height=2, width=3, layout="NHWC")

    out = to_model_input(_batch(), spec, pre)

    assert out.shape == (2, 2, 3, 3)
    np.testing.assert_allclose(out[0, 0, 0], [1.0, -1.0, 51 / 255 * 2 - 1], rtol=1e-6)


def test_float16_input_is_produced_when_asked() -> None:
    out = to_model_input(_batch(), InputSpec(height=2, width=3, dtype="float16"), PreprocessSpec())

    assert out.dtype == np.float16
    assert float(out[0, 0, 0, 0]) == pytest.approx(1.0)


@pytest.mark.parametrize(("layout", "shape"), [("NCHW", (2, 3, 2, 3)), ("NHWC", (2, 2, 3, 3))])
def test_uint8_models_get_the_pixels_unchanged(layout: str, shape: tuple[int, ...]) -> None:
    batch = _batch()
    spec = InputSpec(height=2, width=3, layout=layout, dtype="uint8")

    out = to_model_input(batch, spec, PreprocessSpec(mean=(0.5, 0.5, 0.5)))

    assert out.dtype == np.uint8 and out.shape == shape
    back = out if layout == "NHWC" else out.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(back, batch)


@pytest.mark.parametrize(
    "batch",
    [np.zeros((1, 2, 3, 3), np.float32), np.zeros((2, 3, 3), np.uint8)],
    ids=["float", "3d"],
)
def test_anything_but_a_uint8_nhwc_batch_is_refused(batch: np.ndarray) -> None:
    with pytest.raises(ValueError, match="expected a uint8 NHWC batch"):
        to_model_input(batch, InputSpec(height=2, width=3), PreprocessSpec())


def test_exif_orientation_is_applied_before_the_model_sees_the_photo() -> None:
    import io as _io

    from PIL import Image as _Image

    from serve.imaging.cpu_decode import prepare_image as _prepare
    from serve.model_config import InputSpec as _InputSpec
    from serve.model_config import PreprocessSpec as _PreprocessSpec

    # A landscape frame stored with "rotate 90 CW" (orientation 6): left half dark, right half bright.
    pixels = _Image.new("RGB", (400, 200), (0, 0, 0))
    pixels.paste((255, 255, 255), (200, 0, 400, 200))
    exif = pixels.getexif()
    exif[0x0112] = 6
    buffer = _io.BytesIO()
    pixels.save(buffer, "JPEG", exif=exif.tobytes(), quality=95)

    prepared = _prepare(
        buffer.getvalue(), _InputSpec(height=64, width=64), _PreprocessSpec(resize="stretch"), 10**8
    )

    geometry = prepared.geometry
    assert (geometry.original_height, geometry.original_width) == (400, 200)
    # Upright, the dark half is on top and the bright half at the bottom.
    assert prepared.pixels[:24].mean() < 40
    assert prepared.pixels[-24:].mean() > 215


@pytest.mark.parametrize("sample", ["cat.jpg", "coffee.jpg", "text.jpg", "astronaut.jpg", "rocket.jpg"])
def test_center_crop_matches_resizing_the_whole_photo_then_cropping(sample: str) -> None:
    # The crop is resampled alone; the pixels must be those of the textbook two-step way.
    prepared = prepare_image(_sample(sample), SPEC, PreprocessSpec(resize="center_crop"), BIG)
    photo = decode_image(_sample(sample), (256, 256), BIG)  # at the same reduced DCT scale
    g = prepared.geometry
    size = (round(g.original_width * g.scale_x), round(g.original_height * g.scale_y))
    resized = np.asarray(photo.resize(size, Image.Resampling.BILINEAR))
    top, left = int(-g.offset_y), int(-g.offset_x)
    expected = resized[top : top + 224, left : left + 224]

    difference = np.abs(prepared.pixels.astype(int) - expected.astype(int))
    assert difference.max() <= 1  # float rounding only
    assert difference.mean() < 0.05
