"""The device image pipeline, run with the fake nvImageCodec and the NumPy-backed CuPy stand-in.

The reference everywhere is the CPU path (:func:`serve.imaging.cpu_decode.prepare_image`
then :func:`serve.imaging.cpu_decode.to_model_input`), on the shipped sample photos and the
bundled model's validation photos.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve.imaging import device_batch
from serve.imaging.cpu_decode import prepare_image, to_model_input
from serve.imaging.device_batch import DeviceBatchPreparer, device_decode_unavailable
from serve.model_config import InputSpec, PreprocessSpec, load_model_config
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError
from tests.fakes import fake_cupy, fake_nvimgcodec
from tests.fakes.device_imaging import hide_device_imaging, install_fake_device_imaging

ROOT = Path(__file__).resolve().parents[4]
SAMPLES = ROOT / "infra" / "samples"
MODEL = ROOT / "build" / "model-repository" / "mobilenet_v2" / "1"
LIMIT = 10**8
RAW = InputSpec(
    height=64, width=96, layout="NHWC", dtype="uint8"
)  # model-sized uint8, to compare levels


@pytest.fixture(autouse=True)
def fake_device(monkeypatch):  # noqa: ANN201
    install_fake_device_imaging(monkeypatch)


def _samples() -> list[bytes]:
    return [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg"))]


def _validation() -> list[bytes]:
    files = sorted((MODEL / "validation").glob("*.jpg"))
    assert files, f"no validation photos under {MODEL} (run `make model`)"
    return [p.read_bytes() for p in files]


def _jpeg(image: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=95, **save)
    return buf.getvalue()


def _gradient(width: int = 160, height: int = 100) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(
        np.uint8
    )
    return Image.fromarray(pixels, "RGB")


def _cpu_batch(datas: list[bytes], spec: InputSpec, pre: PreprocessSpec) -> np.ndarray:
    pixels = np.stack([prepare_image(d, spec, pre, LIMIT).pixels for d in datas])
    return to_model_input(pixels, spec, pre)


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.float64) - b.astype(np.float64))


def _reduced_by_libjpeg(data: bytes, spec: InputSpec, pre: PreprocessSpec) -> bool:
    """Whether the CPU path decodes ``data`` at reduced (DCT) scale: then it sees other pixels."""
    with Image.open(io.BytesIO(data)) as image:
        full = image.size
        inner = (int(spec.height / pre.crop_ratio), int(spec.width / pre.crop_ratio))
        image.draft("RGB", (inner[1], inner[0]))
        return image.size != full


def test_rows_match_the_cpu_decoder_on_sample_and_validation_photos() -> None:
    pre = PreprocessSpec()
    datas = _samples() + _validation()[:40]
    preparer = DeviceBatchPreparer(RAW, pre, max_batch=len(datas), max_pixels=LIMIT)
    with preparer.prepare(datas) as batch:
        assert batch.positions == list(range(len(datas)))
        assert set(batch.decoded_on) == {"gpu"}
        reference = [prepare_image(d, RAW, pre, LIMIT) for d in datas]
        for row, (data, ref) in enumerate(zip(datas, reference, strict=True)):
            assert batch.geometries[row] == ref.geometry
            diff = _levels(batch.tensor[row], ref.pixels)
            if _reduced_by_libjpeg(data, RAW, pre):
                assert diff.mean() < 5.0  # libjpeg's 1/2..1/8 scale decode against a full decode
            else:  # the same pixels through the same filter, without Pillow's intermediate rounding
                assert diff.max() <= 1.0 and diff.mean() < 0.3


def test_top1_of_the_cpu_model_agrees_on_device_and_cpu_decoded_inputs() -> None:
    ort = pytest.importorskip("onnxruntime")
    config = load_model_config(MODEL / "config.yaml")
    session = ort.InferenceSession(str(MODEL / "model.onnx"), providers=["CPUExecutionProvider"])
    datas = _samples() + _validation()
    preparer = DeviceBatchPreparer(config.input, config.preprocess, max_batch=32, max_pixels=LIMIT)
    agree, total = 0, 0
    for i in range(0, len(datas), 32):
        chunk = datas[i : i + 32]
        with preparer.prepare(chunk) as batch:
            device = np.asarray(batch.tensor)
            cpu = _cpu_batch(chunk, config.input, config.preprocess)
            assert device.shape == cpu.shape and device.dtype == cpu.dtype
            ours = session.run(None, {config.input.name: device})[0].argmax(axis=1)
            theirs = session.run(None, {config.input.name: cpu})[0].argmax(axis=1)
        agree += int((ours == theirs).sum())
        total += len(chunk)
    assert total == len(datas)
    assert agree / total >= 0.99, f"top-1 agreement {agree}/{total}"


@pytest.mark.parametrize(
    ("resize", "layout", "dtype", "order"),
    [
        ("center_crop", "NCHW", "float32", "RGB"),
        ("stretch", "NHWC", "float16", "BGR"),
        ("letterbox", "NCHW", "float32", "BGR"),
        ("letterbox", "NHWC", "uint8", "RGB"),
    ],
)
def test_every_resize_mode_layout_dtype_and_channel_order(resize, layout, dtype, order) -> None:  # noqa: ANN001
    spec = InputSpec(height=64, width=96, layout=layout, dtype=dtype)
    pre = PreprocessSpec(
        resize=resize, channel_order=order, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    datas = [_jpeg(_gradient(160, 100)), _jpeg(_gradient(90, 140))]
    preparer = DeviceBatchPreparer(spec, pre, max_batch=4, max_pixels=LIMIT)
    with preparer.prepare(datas) as batch:
        cpu = _cpu_batch(datas, spec, pre)
        assert batch.tensor.shape == cpu.shape and batch.tensor.dtype == cpu.dtype
        # one uint8 level is 1/(255 * std) after normalization
        tolerance = 1.0 if dtype == "uint8" else 1.0 / (255 * 0.224) + 0.01
        assert _levels(batch.tensor, cpu).max() <= tolerance
        for row, data in enumerate(datas):
            assert batch.geometries[row] == prepare_image(data, spec, pre, LIMIT).geometry


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_to_the_decoded_region(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _jpeg(_gradient(200, 120), exif=exif.tobytes())
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=1, max_pixels=LIMIT)
    with preparer.prepare([data]) as batch:
        ref = prepare_image(data, RAW, PreprocessSpec(), LIMIT)
        assert batch.geometries[0] == ref.geometry
        assert _levels(batch.tensor[0], ref.pixels).max() <= 1.0
    region = fake_nvimgcodec.STATE.regions[-1]
    (y0, x0), (y1, x1) = region.start, region.end
    assert (y1 - y0) * (x1 - x0) < 200 * 120  # only the part the model sees was decoded


def test_one_decoder_call_per_batch_with_fancy_upsampling_on_the_slot_stream() -> None:
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=8, max_pixels=LIMIT)
    with preparer.prepare(_samples()) as batch:
        assert len(batch.positions) == len(_samples())
    assert fake_nvimgcodec.STATE.calls == [len(_samples())]
    assert len(fake_nvimgcodec.STATE.decoders) == 2  # one per slot
    assert all(d.fancy_upsampling and d.device_id == 0 for d in fake_nvimgcodec.STATE.decoders)
    assert fake_nvimgcodec.STATE.streams[0] != 0  # the slot's own stream, not the legacy default
    assert fake_nvimgcodec.STATE.streams[0] in fake_cupy.STATE.synchronized
    (params,) = fake_nvimgcodec.STATE.params
    assert params.color_spec == fake_nvimgcodec.ColorSpec.SRGB
    assert not params.apply_exif_orientation  # applied on the device, after the region decode


def test_nvimgcodec_0_5_takes_regions_through_decode_sources(monkeypatch) -> None:
    monkeypatch.delattr(fake_nvimgcodec.CodeStream, "get_sub_code_stream")
    data = _jpeg(_gradient(200, 120))
    with DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=1, max_pixels=LIMIT).prepare(
        [data]
    ) as batch:
        assert batch.decoded_on == ["gpu"]
        ref = prepare_image(data, RAW, PreprocessSpec(), LIMIT)
        assert _levels(batch.tensor[0], ref.pixels).max() <= 1.0
    assert fake_nvimgcodec.STATE.regions[-1] is not None


def test_nearest_neighbour_chroma_would_be_further_from_the_cpu_decoder(monkeypatch) -> None:
    datas = _validation()[:24]
    pre = PreprocessSpec()
    cpu = np.stack([prepare_image(d, RAW, pre, LIMIT).pixels for d in datas])

    def error(options: str) -> float:
        monkeypatch.setattr(device_batch, "DECODER_OPTIONS", options)
        with DeviceBatchPreparer(RAW, pre, max_batch=24, max_pixels=LIMIT).prepare(datas) as batch:
            return float(_levels(batch.tensor, cpu).mean())

    assert error(":fancy_upsampling=1") < error(":fancy_upsampling=0")


def test_what_the_gpu_decoder_refuses_goes_to_the_cpu_and_bad_inputs_fail_alone() -> None:
    fake_nvimgcodec.STATE.refuse_progressive = True
    buf = io.BytesIO()
    _gradient().save(buf, "PNG")
    png = buf.getvalue()
    cmyk = _jpeg(_gradient().convert("CMYK"))
    progressive = _jpeg(_gradient(), progressive=True)
    baseline = _jpeg(_gradient())
    datas = [png, b"not an image", cmyk, progressive, baseline, _jpeg(_gradient())[:200]]
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=8, max_pixels=LIMIT)
    with preparer.prepare(datas) as batch:
        assert batch.positions == [0, 2, 3, 4]
        assert batch.decoded_on == ["cpu", "cpu", "cpu", "gpu"]
        for row, pos in enumerate(batch.positions):
            ref = prepare_image(datas[pos], RAW, PreprocessSpec(), LIMIT)
            assert _levels(batch.tensor[row], ref.pixels).max() <= 1.0
        assert set(batch.errors) == {1, 5}
        for pos in (1, 5):
            assert isinstance(batch.errors[pos], PermanentError)
            assert batch.errors[pos].reason is ErrorReason.NOT_AN_IMAGE
        outcomes = batch.outcomes()
        assert outcomes[4] == (3, batch.geometries[3]) and outcomes[5] is batch.errors[5]
    assert fake_nvimgcodec.STATE.calls == [3]  # the two JPEGs it could take and the truncated one


def test_images_over_the_pixel_limit_are_refused_before_decoding_on_both_paths() -> None:
    buf = io.BytesIO()
    _gradient(300, 200).save(buf, "PNG")
    datas = [_jpeg(_gradient(300, 200)), buf.getvalue(), _jpeg(_gradient(50, 40))]
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=4, max_pixels=300 * 200 - 1)
    with preparer.prepare(datas) as batch:
        assert batch.positions == [2]
        for pos in (0, 1):
            assert batch.errors[pos].reason is ErrorReason.IMAGE_TOO_LARGE
            assert "300x200" in str(batch.errors[pos])
    assert fake_nvimgcodec.STATE.calls == [1]


def test_device_out_of_memory_while_decoding_is_transient_for_those_images() -> None:
    fake_nvimgcodec.STATE.out_of_memory = 1
    buf = io.BytesIO()
    _gradient().save(buf, "PNG")
    datas = [_jpeg(_gradient()), buf.getvalue()]
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=4, max_pixels=LIMIT)
    with preparer.prepare(datas) as batch:
        assert isinstance(batch.errors[0], TransientError) and "out of memory" in str(
            batch.errors[0]
        )
        assert batch.positions == [1]  # the CPU-decoded neighbour is unaffected
    with preparer.prepare(datas) as batch:  # the next batch decodes again
        assert batch.positions == [0, 1] and not batch.errors


def test_no_memory_for_the_batch_buffer_is_transient_and_frees_the_slot() -> None:
    fake_cupy.STATE.fail_allocations = 1
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=4, max_pixels=LIMIT, slots=1)
    with pytest.raises(TransientError, match="out of memory for the batch buffer"):
        preparer.prepare([_jpeg(_gradient())])
    with preparer.prepare([_jpeg(_gradient())]) as batch:
        assert batch.positions == [0]


def test_slots_are_reused_only_once_released(monkeypatch) -> None:
    monkeypatch.setattr(device_batch, "_SLOT_WAIT_S", 0.01)
    preparer = DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=2, max_pixels=LIMIT, slots=2)
    first = preparer.prepare([_jpeg(_gradient())])
    second = preparer.prepare([_jpeg(_gradient(80, 80))])
    assert first.tensor.base is not second.tensor.base  # two buffers: neither overwrites the other
    with pytest.raises(RuntimeError, match="not released"):
        preparer.prepare([_jpeg(_gradient())])
    first.release()
    with preparer.prepare([_jpeg(_gradient())]) as third:
        assert third.positions == [0]
    second.release()
    with pytest.raises(ValueError, match="exceeds max_batch 2"):
        preparer.prepare([b""] * 3)


def test_missing_libraries_fail_with_the_install_hint(monkeypatch) -> None:
    hide_device_imaging(monkeypatch)
    with pytest.raises(ConfigError, match="pip install nvidia-nvimgcodec-cu12"):
        DeviceBatchPreparer(RAW, PreprocessSpec(), max_batch=1, max_pixels=LIMIT)
    assert "CuPy" in (device_decode_unavailable() or "")


def test_availability_needs_a_cuda_device(monkeypatch) -> None:
    assert device_decode_unavailable() is None
    assert "no CUDA device 1" in (device_decode_unavailable(1) or "")
    install_fake_device_imaging(monkeypatch, device_count=0)
    assert "no CUDA device" in (device_decode_unavailable() or "")
