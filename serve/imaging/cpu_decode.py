"""Decoding and preprocessing: image bytes in, a compact uint8 tensor out.

Phone photos are 12 MP JPEGs while models look at a few hundred pixels, so a
JPEG is decoded at reduced scale with libjpeg's DCT scaling (Pillow's
``draft``): decoding at 1/8 scale is several times cheaper than a full decode
followed by a resize. Normalization to float happens later, per batch, in the
model deployment, so what travels between deployments stays uint8.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from serve.model_config import InputSpec, PreprocessSpec
from serve.postprocess.base import ImageGeometry
from shared.errors import ErrorReason, PermanentError

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """One image ready for batching: ``pixels`` is uint8 HWC RGB/BGR at model size."""

    pixels: np.ndarray
    geometry: ImageGeometry


def decode_image(data: bytes, target: tuple[int, int], max_pixels: int) -> Image.Image:
    """Decode ``data`` to upright RGB, letting libjpeg downscale while keeping at least ``target`` (h, w).

    Raises:
        PermanentError: ``not_an_image`` for undecodable bytes, ``image_too_large``
            when the header declares more than ``max_pixels`` pixels.
    """
    return _decode(data, target, max_pixels)[0]


def _decode(data: bytes, target: tuple[int, int], max_pixels: int) -> tuple[Image.Image, tuple[int, int]]:
    """The upright RGB image (at reduced scale where libjpeg can) and the upright
    photo's full-resolution (width, height)."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past 2x raises) on decompression bombs; we check ourselves.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise PermanentError(
                    ErrorReason.IMAGE_TOO_LARGE,
                    f"image is {width}x{height} = {width * height} pixels, limit {max_pixels}",
                )
            # Phone cameras store pixels sideways plus an EXIF orientation tag;
            # the model and the result coordinates must see the photo upright.
            # Orientations 5-8 are 90 degree rotations: the upright photo's axes swap.
            if image.getexif().get(_EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width
            # draft() only changes JPEG decoding: it picks the largest DCT scale
            # (1/2, 1/4, 1/8) whose result is still at least the requested size.
            image.draft("RGB", (target[1], target[0]))
            # In place: without a rotation to apply, exif_transpose would copy the image.
            ImageOps.exif_transpose(image, in_place=True)
            if image.mode != "RGB":
                image = image.convert("RGB")
    except PermanentError:
        raise
    except Image.DecompressionBombError as err:
        # Pillow's own hard limit (2x MAX_IMAGE_PIXELS) fires in open(), before our check.
        raise PermanentError(ErrorReason.IMAGE_TOO_LARGE, f"image too large: {err}") from err
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise PermanentError(ErrorReason.NOT_AN_IMAGE, f"cannot decode image: {err}") from err
    return image, (width, height)


def prepare_image(
    data: bytes, spec: InputSpec, pre: PreprocessSpec, max_pixels: int
) -> PreparedImage:
    """Decode and resize ``data`` for a model with input ``spec``."""
    out_h, out_w = spec.height, spec.width
    if pre.resize == "center_crop":
        inner = (int(out_h / pre.crop_ratio), int(out_w / pre.crop_ratio))
    else:
        inner = (out_h, out_w)
    image, (orig_w, orig_h) = _decode(data, inner, max_pixels)
    if pre.resize == "stretch":
        pixels = np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR))
        geometry = ImageGeometry(orig_h, orig_w, out_h, out_w, out_h / orig_h, out_w / orig_w)
    elif pre.resize == "letterbox":
        pixels, geometry = _letterbox(image, out_h, out_w, pre.pad_value, orig_h, orig_w)
    else:
        pixels, geometry = _center_crop(image, out_h, out_w, pre.crop_ratio, orig_h, orig_w)
    if pre.channel_order == "BGR":
        pixels = pixels[..., ::-1]
    return PreparedImage(pixels=np.ascontiguousarray(pixels, dtype=np.uint8), geometry=geometry)


def _center_crop(
    image: Image.Image, out_h: int, out_w: int, crop_ratio: float, orig_h: int, orig_w: int
) -> tuple[np.ndarray, ImageGeometry]:
    short = min(orig_h, orig_w)
    scale = min(out_h, out_w) / crop_ratio / short  # input px per original px
    rh, rw = max(out_h, round(orig_h * scale)), max(out_w, round(orig_w * scale))
    top, left = (rh - out_h) // 2, (rw - out_w) // 2
    # Resample only the window that survives the crop: the same pixels as resizing
    # the whole image to (rw, rh) and cropping (the filter still reads the source
    # beyond the window's edges), for a fraction of the work.
    sx, sy = image.width / rw, image.height / rh
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    pixels = np.asarray(image.resize((out_w, out_h), Image.Resampling.BILINEAR, box=box))
    geometry = ImageGeometry(
        orig_h, orig_w, out_h, out_w, rh / orig_h, rw / orig_w, float(-top), float(-left)
    )
    return pixels, geometry


def _letterbox(
    image: Image.Image, out_h: int, out_w: int, pad: int, orig_h: int, orig_w: int
) -> tuple[np.ndarray, ImageGeometry]:
    scale = min(out_h / orig_h, out_w / orig_w)
    rh, rw = max(1, round(orig_h * scale)), max(1, round(orig_w * scale))
    resized = np.asarray(image.resize((rw, rh), Image.Resampling.BILINEAR))
    canvas = np.full((out_h, out_w, 3), pad, dtype=np.uint8)
    top, left = (out_h - rh) // 2, (out_w - rw) // 2
    canvas[top : top + rh, left : left + rw] = resized
    geometry = ImageGeometry(
        orig_h, orig_w, out_h, out_w, rh / orig_h, rw / orig_w, float(top), float(left)
    )
    return canvas, geometry


def to_model_input(batch: np.ndarray, spec: InputSpec, pre: PreprocessSpec) -> np.ndarray:
    """Turn a uint8 NHWC batch into the model's input tensor (layout, dtype, mean/std)."""
    if batch.dtype != np.uint8 or batch.ndim != 4:
        raise ValueError(f"expected a uint8 NHWC batch, got {batch.dtype} {batch.shape}")
    if spec.dtype == "uint8":
        out = batch
    else:
        mean = np.asarray(pre.mean, dtype=np.float32) / pre.scale
        inv_std = pre.scale / np.asarray(pre.std, dtype=np.float32)
        out = (batch.astype(np.float32) - mean) * inv_std
        out = out.astype(spec.dtype, copy=False)
    if spec.layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out)
