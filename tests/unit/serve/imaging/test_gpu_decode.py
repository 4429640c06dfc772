"""GPU JPEG decoding: the CPU fallback, and the GPU path with a stand-in for nvJPEG."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.imaging import gpu_decode
from serve.imaging.cpu_decode import prepare_image
from serve.model_config import InputSpec, PreprocessSpec
from shared.errors import ErrorReason, PermanentError

SAMPLES = Path(__file__).resolve().parents[4] / "infra" / "samples"
SPEC = InputSpec(height=64, width=96)
LIMIT = 10**8


def _photos() -> list[bytes]:
    return [(SAMPLES / name).read_bytes() for name in ("cat.jpg", "coffee.jpg", "rocket.jpg")]


def _jpeg(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


@pytest.fixture
def stand_in_nvjpeg(monkeypatch):  # noqa: ANN201
    """A decoder with nvJPEG's contract (list of byte tensors in, CHW uint8 RGB out), on the
    CPU, that refuses progressive JPEGs as nvJPEG's hardware path can."""
    torch = pytest.importorskip("torch")
    calls: list[int] = []

    def decode(tensors: list, device: str) -> list:
        calls.append(len(tensors))
        out = []
        for t in tensors:
            image = Image.open(io.BytesIO(bytes(t.numpy())))
            if image.info.get("progressive"):
                raise RuntimeError("nvjpeg: unsupported JPEG")
            rgb = np.asarray(image.convert("RGB")).copy()
            out.append(torch.from_numpy(rgb).permute(2, 0, 1))
        return out

    monkeypatch.setattr(gpu_decode, "_decoder", lambda: decode)
    return calls


def test_without_gpu_decoding_everything_goes_through_the_cpu_decoder(monkeypatch) -> None:
    monkeypatch.setattr(gpu_decode, "_decoder", lambda: None)
    assert not gpu_decode.gpu_decode_available()
    assert gpu_decode.decode_backend() == "cpu"
    datas = [*_photos(), b"not an image"]
    got = gpu_decode.prepare_batch_gpu(datas, SPEC, PreprocessSpec(), max_pixels=LIMIT)
    for data, item in zip(datas[:3], got[:3], strict=True):
        want = prepare_image(data, SPEC, PreprocessSpec(), LIMIT)
        np.testing.assert_array_equal(item.pixels, want.pixels)  # type: ignore[union-attr]
    assert isinstance(got[3], PermanentError) and got[3].reason is ErrorReason.NOT_AN_IMAGE


@pytest.mark.parametrize(
    "pre",
    [
        PreprocessSpec(),
        PreprocessSpec(resize="stretch", channel_order="BGR"),
        PreprocessSpec(resize="letterbox", pad_value=114),
    ],
    ids=["center_crop", "stretch-bgr", "letterbox"],
)
def test_gpu_path_matches_the_cpu_path(stand_in_nvjpeg, pre) -> None:
    datas = _photos()
    got = gpu_decode.prepare_batch_gpu(datas, SPEC, pre, max_pixels=LIMIT)
    assert stand_in_nvjpeg == [3]  # one batched decode
    for data, item in zip(datas, got, strict=True):
        want = prepare_image(data, SPEC, pre, LIMIT)
        assert item.geometry == want.geometry  # type: ignore[union-attr]
        assert item.pixels.shape == want.pixels.shape == (64, 96, 3)  # type: ignore[union-attr]
        # Only resampling differs (the CPU decoder lets libjpeg downscale first).
        diff = np.abs(item.pixels.astype(int) - want.pixels.astype(int)).mean()  # type: ignore[union-attr]
        assert diff < 4.0


def test_exif_orientation_is_applied(stand_in_nvjpeg) -> None:
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 0, 20, 20))  # blue left half
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a sideways camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 clockwise to view
    [pixels] = gpu_decode.decode_batch_gpu([_jpeg(stored, exif=exif)], max_pixels=LIMIT)
    assert pixels.shape == (20, 40, 3)  # type: ignore[union-attr]
    want = prepare_image(_jpeg(stored, exif=exif), InputSpec(height=20, width=40),
                         PreprocessSpec(resize="stretch"), LIMIT).pixels  # fmt: skip
    assert np.abs(pixels.astype(int) - want.astype(int)).mean() < 4.0  # type: ignore[union-attr]


def test_one_bad_input_never_fails_its_neighbours(stand_in_nvjpeg) -> None:
    photo = Image.open(io.BytesIO(_photos()[0]))
    progressive = _jpeg(photo, progressive=True)  # nvJPEG refuses it: decoded on the CPU
    png = io.BytesIO()
    photo.save(png, "PNG")  # not a JPEG: decoded on the CPU
    huge = _jpeg(Image.new("RGB", (500, 500)))
    datas = [_photos()[0], progressive, b"\xff\xd8 truncated", png.getvalue(), huge]
    got = gpu_decode.prepare_batch_gpu(datas, SPEC, PreprocessSpec(), max_pixels=200_000)
    assert [type(g).__name__ for g in got] == [
        "PreparedImage", "PreparedImage", "PermanentError", "PreparedImage", "PermanentError",
    ]  # fmt: skip
    assert got[2].reason is ErrorReason.NOT_AN_IMAGE  # type: ignore[union-attr]
    assert got[4].reason is ErrorReason.IMAGE_TOO_LARGE  # type: ignore[union-attr]
    assert stand_in_nvjpeg == [2, 1, 1]  # the batch failed, then each JPEG alone
