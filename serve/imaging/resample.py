"""Resampling plans shared by the device pipeline: which source pixels each output pixel reads.

A plan is computed on the host from the header alone (upright size, model input,
preprocessing), in the same arithmetic as :mod:`serve.imaging.cpu_decode`: the same
box, the same geometry, and Pillow's antialiased bilinear filter (a triangle whose
support grows with the downscale factor, clamped at the image's edges). Because the
taps say exactly which rows and columns are read, they also give the *region to
decode*: for a centre crop of a 4:3 photo, about 57% of its pixels.

The device side (:func:`resample`) runs with any NumPy-compatible array module
``xp`` (CuPy on the GPU, NumPy in tests): a gather-multiply-sum per group of filter
taps, uint8 in, float32 only at output width (first pass) and output size (second pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.model_config import InputSpec, PreprocessSpec
from serve.postprocess.base import ImageGeometry

__all__ = ["Region", "ResizePlan", "Taps", "orient", "plan_resize", "resample", "stored_region"]


@dataclass(frozen=True, slots=True)
class Taps:
    """For each output index: ``index[i, k]`` (relative to the region) and ``weight[i, k]``."""

    index: np.ndarray  # int32 (out, K)
    weight: np.ndarray  # float32 (out, K), rows sum to 1


@dataclass(frozen=True, slots=True)
class Region:
    """A half-open pixel rectangle ``[y0, y1) x [x0, x1)``."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0


@dataclass(frozen=True, slots=True)
class ResizePlan:
    """How one upright image becomes its slot of the batch.

    Attributes:
        region: The upright pixels the filter reads (the only ones worth decoding).
        rows, cols: Filter taps, relative to ``region``.
        size: ``(height, width)`` of the resampled image.
        offset: ``(top, left)`` of the resampled image in the slot (letterbox padding).
        geometry: Mapping between original and model coordinates, as the CPU path reports it.
    """

    region: Region
    rows: Taps
    cols: Taps
    size: tuple[int, int]
    offset: tuple[int, int]
    geometry: ImageGeometry


def _pillow_taps(
    in_size: int, in0: float, in1: float, out_size: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """First source index and weights per output index, as Pillow's ``precompute_coeffs``
    for the bilinear filter (support 1, scaled by the downscale factor)."""
    scale = (in1 - in0) / out_size
    filter_scale = max(scale, 1.0)
    support = filter_scale
    firsts = np.empty(out_size, dtype=np.int64)
    weights: list[np.ndarray] = []
    for i in range(out_size):
        center = in0 + (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        x = (np.arange(lo, hi, dtype=np.float64) - center + 0.5) / filter_scale
        w = np.clip(1.0 - np.abs(x), 0.0, None)
        total = w.sum()
        firsts[i] = lo
        weights.append(w / total if total > 0 else np.ones_like(w) / max(len(w), 1))
    return firsts, weights


def _taps(in_size: int, in0: float, in1: float, out_size: int) -> tuple[Taps, int, int]:
    """Taps relative to the span they read, and that span ``[lo, hi)`` in source pixels."""
    firsts, weights = _pillow_taps(in_size, in0, in1, out_size)
    lo = int(firsts.min())
    hi = int(max(f + len(w) for f, w in zip(firsts, weights, strict=True)))
    width = max(len(w) for w in weights)
    index = np.zeros((out_size, width), dtype=np.int32)
    weight = np.zeros((out_size, width), dtype=np.float32)
    for i, (first, w) in enumerate(zip(firsts, weights, strict=True)):
        n = len(w)
        index[i, :n] = np.arange(first - lo, first - lo + n)
        index[i, n:] = first - lo  # zero weight: any valid index will do
        weight[i, :n] = w
    return Taps(index, weight), lo, hi


def plan_resize(width: int, height: int, spec: InputSpec, pre: PreprocessSpec) -> ResizePlan:
    """The plan for an upright ``width`` x ``height`` image (see :mod:`serve.imaging.cpu_decode`)."""
    out_h, out_w = spec.height, spec.width
    offset = (0, 0)
    if pre.resize == "stretch":
        size, box = (out_h, out_w), (0.0, 0.0, float(width), float(height))
        geometry = ImageGeometry(height, width, out_h, out_w, out_h / height, out_w / width)
    elif pre.resize == "letterbox":
        scale = min(out_h / height, out_w / width)
        rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
        top, left = (out_h - rh) // 2, (out_w - rw) // 2
        size, box, offset = (rh, rw), (0.0, 0.0, float(width), float(height)), (top, left)
        geometry = ImageGeometry(
            height, width, out_h, out_w, rh / height, rw / width, float(top), float(left)
        )
    else:
        scale = min(out_h, out_w) / pre.crop_ratio / min(height, width)
        rh, rw = max(out_h, round(height * scale)), max(out_w, round(width * scale))
        top, left = (rh - out_h) // 2, (rw - out_w) // 2
        sx, sy = width / rw, height / rh
        size = (out_h, out_w)
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        geometry = ImageGeometry(
            height, width, out_h, out_w, rh / height, rw / width, float(-top), float(-left)
        )
    rows, y0, y1 = _taps(height, box[1], box[3], size[0])
    cols, x0, x1 = _taps(width, box[0], box[2], size[1])
    return ResizePlan(Region(y0, x0, y1, x1), rows, cols, size, offset, geometry)


def stored_region(region: Region, orientation: int, stored_w: int, stored_h: int) -> Region:
    """The stored-orientation rectangle whose pixels, turned upright, are ``region``.

    EXIF orientations as ``ImageOps.exif_transpose`` applies them: 2 mirror, 3 rotate
    180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise.
    """
    y0, x0, y1, x1 = region.y0, region.x0, region.y1, region.x1
    w, h = stored_w, stored_h
    mapping = {
        1: (y0, x0, y1, x1),
        2: (y0, w - x1, y1, w - x0),
        3: (h - y1, w - x1, h - y0, w - x0),
        4: (h - y1, x0, h - y0, x1),
        5: (x0, y0, x1, y1),
        6: (h - x1, y0, h - x0, y1),
        7: (h - x1, w - y1, h - x0, w - y0),
        8: (x0, w - y1, x1, w - y0),
    }
    return Region(*mapping.get(orientation, mapping[1]))


def orient(xp: Any, pixels: Any, orientation: int) -> Any:
    """Turn stored HWC ``pixels`` upright (views, no copy), as ``exif_transpose``."""
    if orientation == 2:
        return pixels[:, ::-1]
    if orientation == 3:
        return pixels[::-1, ::-1]
    if orientation == 4:
        return pixels[::-1]
    if orientation == 5:
        return pixels.transpose(1, 0, 2)
    if orientation == 6:
        return xp.rot90(pixels, -1, axes=(0, 1))
    if orientation == 7:
        return pixels[::-1, ::-1].transpose(1, 0, 2)
    if orientation == 8:
        return xp.rot90(pixels, 1, axes=(0, 1))
    return pixels


#: Elements of one gathered group of taps (float32 after weighting: 32 MB): several taps go
#: into one gather-multiply-sum, which cuts kernel launches per image on the GPU, while no
#: temporary grows past this, however large the photo.
GROUP_ELEMENTS = 8 << 20


def _filter_pass(xp: Any, src: Any, taps: Taps, axis: int) -> Any:
    """Apply ``taps`` along ``axis`` (0: rows, 1: columns) of HWC ``src``; float32 out."""
    index, weight = xp.asarray(taps.index), xp.asarray(taps.weight)
    out_len, count = taps.index.shape
    other = src.shape[1 - axis] * src.shape[2]
    group = max(1, min(count, GROUP_ELEMENTS // max(1, out_len * other)))
    shape = (
        (out_len, src.shape[1], src.shape[2])
        if axis == 0
        else (src.shape[0], out_len, src.shape[2])
    )
    out = xp.zeros(shape, dtype=xp.float32)
    for k in range(0, count, group):
        idx, w = index[:, k : k + group], weight[:, k : k + group]
        if axis == 0:  # (out, g, W, C)
            out += (src[idx] * w[:, :, None, None]).sum(axis=1)
        else:  # (H, out, g, C)
            out += (src[:, idx] * w[None, :, :, None]).sum(axis=2)
    return out


def resample(xp: Any, pixels: Any, plan: ResizePlan) -> Any:
    """Resample upright uint8 HWC ``pixels`` (exactly ``plan.region``) to ``plan.size``.

    Returns float32 HWC values on the uint8 grid (0..255). As Pillow does for 8-bit
    images, the horizontal pass comes first and its result is rounded (half up) and
    clipped to uint8 before the vertical pass, so both paths quantize alike.
    """
    wide = xp.clip(xp.floor(_filter_pass(xp, pixels, plan.cols, axis=1) + 0.5), 0, 255)
    return xp.clip(xp.floor(_filter_pass(xp, wide, plan.rows, axis=0) + 0.5), 0, 255)
