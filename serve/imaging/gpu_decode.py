"""JPEG decoding and resizing on the GPU for GPU replicas, with the CPU decoder as fallback.

Superseded and unused: the service decodes on the GPU in the model replica
(:mod:`serve.model.encoded_batch` over :mod:`serve.imaging.device_batch`); nothing
imports this module. It is deleted together with the docs pages that still name it.

On a GPU node the CPU, not the GPU, limits the HTTP path: decoding phone photos
costs milliseconds of CPU per image. nvJPEG (through ``torchvision.io.decode_jpeg``
on a CUDA device) decodes a whole batch on the GPU, and the resize/crop that
follows runs there too, so only model-sized uint8 images come back to the host.

The output matches :func:`serve.imaging.cpu_decode.prepare_image` (same resize modes, the
same geometry, EXIF orientation applied, channel order) up to resampling
differences: the CPU path lets libjpeg decode at reduced scale first, this one
decodes at full scale and resizes with antialiasing.

Everything that is not possible on the GPU falls back to the CPU decoder, per
image: no torch/torchvision or no CUDA device (the whole batch), a non-JPEG
input or a JPEG nvJPEG refuses (that image). A bad input never fails its
neighbours: each position of the result holds a ``PreparedImage`` or the
``PermanentError`` that input deserves.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from serve.engines.errors import is_out_of_memory
from serve.imaging.cpu_decode import PreparedImage, prepare_image
from serve.model_config import InputSpec, PreprocessSpec
from serve.postprocess.base import ImageGeometry
from shared.errors import ErrorReason, PermanentError, TransientError

logger = logging.getLogger(__name__)

__all__ = ["decode_backend", "decode_batch_gpu", "gpu_decode_available", "prepare_batch_gpu"]

_EXIF_ORIENTATION = 0x0112
#: Decodes a list of JPEG byte tensors on ``device``; returns CHW uint8 RGB tensors there.
GpuJpegDecoder = Callable[[list[Any], str], list[Any]]


@functools.cache
def _torch_decoder() -> GpuJpegDecoder | None:
    """torchvision's nvJPEG-backed batch decoder, or None when it cannot be used here."""
    try:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as err:
        logger.info("GPU JPEG decoding unavailable (%s); decoding on the CPU", err)
        return None
    if not torch.cuda.is_available():
        logger.info("GPU JPEG decoding unavailable (no CUDA device); decoding on the CPU")
        return None

    def decode(tensors: list[Any], device: str) -> list[Any]:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)

    try:  # torchvision built without nvJPEG, or a driver mismatch, fails here, not per image
        probe = io.BytesIO()
        Image.new("RGB", (16, 16), (200, 100, 50)).save(probe, "JPEG")
        decode([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)], "cuda")
    except RuntimeError as err:
        logger.warning("GPU JPEG decoding unavailable (%s); decoding on the CPU", err)
        return None
    return decode


def _decoder() -> GpuJpegDecoder | None:
    return _torch_decoder()


def gpu_decode_available() -> bool:
    """Whether JPEGs are decoded on the GPU here (torch, torchvision and a CUDA device)."""
    return _decoder() is not None


def decode_backend(device: int = 0) -> str:
    """What decodes JPEGs: ``nvjpeg:cuda:0`` or ``cpu`` (for logs and results)."""
    return f"nvjpeg:cuda:{device}" if gpu_decode_available() else "cpu"


def _header(data: bytes, max_pixels: int) -> tuple[str, int, int, int]:
    """``(format, width, height, EXIF orientation)`` from the header alone.

    Raises:
        PermanentError: ``not_an_image`` / ``image_too_large``, as the CPU decoder would.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt, (width, height) = image.format or "", image.size
                orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Image.DecompressionBombError as err:
        raise PermanentError(ErrorReason.IMAGE_TOO_LARGE, f"image too large: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PermanentError(ErrorReason.NOT_AN_IMAGE, f"cannot decode image: {err}") from err
    if width * height > max_pixels:
        raise PermanentError(
            ErrorReason.IMAGE_TOO_LARGE,
            f"image is {width}x{height} = {width * height} pixels, limit {max_pixels}",
        )
    return fmt, width, height, orientation


def _upright(chw: Any, orientation: int) -> Any:
    """Apply an EXIF orientation (1-8) to a CHW tensor, as ``ImageOps.exif_transpose``."""
    import torch

    if orientation in (2, 4, 5, 7):  # mirrored variants
        chw = torch.flip(chw, dims=[2])
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise
    return torch.rot90(chw, k=turns, dims=[1, 2]) if turns else chw


def _decode_jpegs(
    datas: Sequence[bytes], positions: list[int], device: int
) -> dict[int, Any | PermanentError]:
    """nvJPEG-decode ``datas[positions]`` as one batch; an undecodable image is retried alone
    so that it cannot fail the batch, and then left to the CPU decoder."""
    import torch

    decode = _decoder()
    assert decode is not None  # callers check gpu_decode_available()
    target = f"cuda:{device}"
    tensors = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in positions]
    try:
        return dict(zip(positions, decode(tensors, target), strict=True))
    except RuntimeError:
        decoded: dict[int, Any | PermanentError] = {}
        for i, tensor in zip(positions, tensors, strict=True):
            try:
                decoded[i] = decode([tensor], target)[0]
            except RuntimeError as err:
                logger.info("nvJPEG refused input %d (%s); decoding it on the CPU", i, err)
        return decoded


def _split(
    datas: Sequence[bytes], max_pixels: int, on_cpu: Callable[[bytes], Any]
) -> tuple[list[Any], dict[int, int]]:
    """Per input: its header error, or ``on_cpu(data)`` unless it is a JPEG for nvJPEG.

    Returns the results so far and the positions left for the GPU, with their EXIF
    orientation.
    """
    results: list[Any] = [None] * len(datas)
    on_gpu: dict[int, int] = {}
    for i, data in enumerate(datas):
        try:
            fmt, _, _, orientation = _header(data, max_pixels)
        except PermanentError as err:
            results[i] = err
            continue
        if fmt == "JPEG" and gpu_decode_available():
            on_gpu[i] = orientation
        else:
            results[i] = on_cpu(data)
    return results, on_gpu


def decode_batch_gpu(
    datas: Sequence[bytes], *, max_pixels: int, device: int = 0
) -> list[np.ndarray | PermanentError]:
    """Decode images to full-resolution, upright RGB ``uint8`` HWC arrays on the host.

    JPEGs go to nvJPEG in one batch; other formats, JPEGs nvJPEG refuses and every image
    on a machine without GPU decoding go through Pillow. Each position holds the array or
    the ``PermanentError`` (``not_an_image``, ``image_too_large``) of that input.
    """
    results, on_gpu = _split(datas, max_pixels, lambda data: _cpu_full_decode(data, max_pixels))
    if on_gpu:
        decoded = _decode_jpegs(datas, list(on_gpu), device)
        for i, orientation in on_gpu.items():
            chw = decoded.get(i)
            if chw is None:
                results[i] = _cpu_full_decode(datas[i], max_pixels)
            else:
                results[i] = _upright(chw, orientation).permute(1, 2, 0).contiguous().cpu().numpy()
    return results


def _cpu_full_decode(data: bytes, max_pixels: int) -> np.ndarray | PermanentError:
    from serve.imaging.cpu_decode import decode_image

    try:
        image = decode_image(data, (1 << 30, 1 << 30), max_pixels)  # no reduced-scale decode
    except PermanentError as err:
        return err
    return np.asarray(image, dtype=np.uint8)


def prepare_batch_gpu(
    datas: Sequence[bytes],
    spec: InputSpec,
    pre: PreprocessSpec,
    *,
    max_pixels: int,
    device: int = 0,
) -> list[PreparedImage | PermanentError]:
    """:func:`serve.imaging.cpu_decode.prepare_image` for a batch, decoded and resized on the GPU.

    Returns, per input, the model-sized ``PreparedImage`` (uint8 HWC in the model's
    channel order, with its geometry) or the input's ``PermanentError``. Without GPU
    decoding every image goes through ``prepare_image`` on the CPU.
    """
    results, on_gpu = _split(datas, max_pixels, lambda data: _cpu_prepare(data, spec, pre, max_pixels))
    if not on_gpu:
        return results
    decoded = _decode_jpegs(datas, list(on_gpu), device)
    ready: dict[int, tuple[Any, ImageGeometry]] = {}
    for i, orientation in on_gpu.items():
        chw = decoded.get(i)
        if chw is None:
            results[i] = _cpu_prepare(datas[i], spec, pre, max_pixels)
        else:
            with _device_memory_is_transient():
                ready[i] = _resize_on_gpu(_upright(chw, orientation), spec, pre)
    if ready:
        import torch

        # One device-to-host copy for the whole batch: model-sized uint8 images only.
        with _device_memory_is_transient():
            host = torch.stack([t for t, _ in ready.values()]).cpu().numpy()
        for row, (i, (_, geometry)) in enumerate(ready.items()):
            results[i] = PreparedImage(pixels=np.ascontiguousarray(host[row]), geometry=geometry)
    return results


@contextlib.contextmanager
def _device_memory_is_transient() -> Iterator[None]:
    """A GPU out of memory says nothing about the image: retry it, never ``not_an_image``."""
    try:
        yield
    except Exception as err:
        if is_out_of_memory(err):
            raise TransientError(f"GPU out of memory preparing an image: {err}"[:500]) from err
        raise


def _cpu_prepare(
    data: bytes, spec: InputSpec, pre: PreprocessSpec, max_pixels: int
) -> PreparedImage | PermanentError:
    try:
        return prepare_image(data, spec, pre, max_pixels)
    except PermanentError as err:
        return err


def _resize(chw: Any, height: int, width: int) -> Any:
    """Bilinear with antialiasing (as Pillow's ``BILINEAR``), back to uint8."""
    import torch
    import torch.nn.functional as functional

    x = functional.interpolate(
        chw[None].float(),
        size=(height, width),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def _resize_on_gpu(chw: Any, spec: InputSpec, pre: PreprocessSpec) -> tuple[Any, ImageGeometry]:
    """Resize/crop/pad an upright CHW image to the model input; returns HWC and the geometry
    (the same arithmetic as :mod:`serve.imaging.cpu_decode`)."""
    import torch

    out_h, out_w = spec.height, spec.width
    orig_h, orig_w = int(chw.shape[1]), int(chw.shape[2])
    if pre.resize == "stretch":
        pixels = _resize(chw, out_h, out_w)
        geometry = ImageGeometry(orig_h, orig_w, out_h, out_w, out_h / orig_h, out_w / orig_w)
    elif pre.resize == "letterbox":
        scale = min(out_h / orig_h, out_w / orig_w)
        rh, rw = max(1, round(orig_h * scale)), max(1, round(orig_w * scale))
        pixels = torch.full((3, out_h, out_w), pre.pad_value, dtype=torch.uint8, device=chw.device)
        top, left = (out_h - rh) // 2, (out_w - rw) // 2
        pixels[:, top : top + rh, left : left + rw] = _resize(chw, rh, rw)
        geometry = ImageGeometry(
            orig_h, orig_w, out_h, out_w, rh / orig_h, rw / orig_w, float(top), float(left)
        )
    else:
        scale = min(out_h, out_w) / pre.crop_ratio / min(orig_h, orig_w)
        rh, rw = max(out_h, round(orig_h * scale)), max(out_w, round(orig_w * scale))
        top, left = (rh - out_h) // 2, (rw - out_w) // 2
        pixels = _resize(chw, rh, rw)[:, top : top + out_h, left : left + out_w]
        geometry = ImageGeometry(
            orig_h, orig_w, out_h, out_w, rh / orig_h, rw / orig_w, float(-top), float(-left)
        )
    if pre.channel_order == "BGR":
        pixels = pixels.flip(0)
    return pixels.permute(1, 2, 0).contiguous(), geometry
