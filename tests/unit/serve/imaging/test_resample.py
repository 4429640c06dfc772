"""Resampling plans: Pillow's filter and box, the region read, EXIF orientation of regions."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serve.imaging import resample as resample_module
from serve.imaging.resample import Region, orient, plan_resize, resample, stored_region
from serve.model_config import InputSpec, PreprocessSpec

SPEC = InputSpec(height=224, width=224)
# PIL's transposes for EXIF orientations, as ImageOps.exif_transpose applies them.
EXIF_METHODS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack(
        [x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], axis=-1
    )
    return np.clip(smooth + rng.integers(-20, 21, size=smooth.shape), 0, 255).astype(np.uint8)


def _pillow_crop(pixels: np.ndarray, plan) -> np.ndarray:  # noqa: ANN001
    g = plan.geometry
    height, width = pixels.shape[:2]
    rh, rw = round(g.scale_y * height), round(g.scale_x * width)
    top, left = -int(g.offset_y), -int(g.offset_x)
    sx, sy = width / rw, height / rh
    box = (left * sx, top * sy, (left + SPEC.width) * sx, (top + SPEC.height) * sy)
    image = Image.fromarray(pixels)
    return np.asarray(image.resize((SPEC.width, SPEC.height), Image.Resampling.BILINEAR, box=box))


@pytest.mark.parametrize(("width", "height"), [(300, 451), (1600, 1200), (4032, 3024)])
def test_centre_crop_matches_pillow_and_reads_only_its_region(width: int, height: int) -> None:
    pixels = _photo(width, height)
    plan = plan_resize(width, height, SPEC, PreprocessSpec())
    r = plan.region
    assert r.height * r.width < width * height  # the sides outside the crop are never read
    out = resample(np, pixels[r.y0 : r.y1, r.x0 : r.x1], plan)
    diff = np.abs(out - _pillow_crop(pixels, plan))
    # Horizontal pass first, rounded to uint8, as Pillow; the Pillow build here does some
    # shapes vertical pass first, which moves a pixel's rounding by one level at most.
    assert diff.max() <= 1.0 and diff.mean() < 0.3


def test_grouping_taps_changes_nothing_but_the_number_of_steps(monkeypatch) -> None:
    pixels = _photo(1600, 1200)
    plan = plan_resize(1600, 1200, SPEC, PreprocessSpec())
    crop = pixels[plan.region.y0 : plan.region.y1, plan.region.x0 : plan.region.x1]
    grouped = resample(np, crop, plan)
    monkeypatch.setattr(resample_module, "GROUP_ELEMENTS", 1)  # one tap per step
    assert np.abs(resample(np, crop, plan) - grouped).max() <= 1.0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_region_of_the_upright_photo_maps_to_its_stored_pixels(orientation: int) -> None:
    stored = _photo(70, 40)
    image = Image.fromarray(stored)
    upright = np.asarray(image.transpose(EXIF_METHODS[orientation]) if orientation > 1 else image)
    region = Region(5, 9, 31, 22)
    s = stored_region(region, orientation, 70, 40)
    got = orient(np, stored[s.y0 : s.y1, s.x0 : s.x1], orientation)
    np.testing.assert_array_equal(got, upright[region.y0 : region.y1, region.x0 : region.x1])
