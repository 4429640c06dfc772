"""Deriving the accuracy guard's validation sets and the INT8 calibration sets.

The photos come from scikit-image's bundled data (``skimage/data/`` in the
scikit-image 0.26.0 wheel, read straight from the wheel, CC0 / public domain,
see ``infra/models/SOURCES.md``). A handful of photos is not a
validation set, so each is cut into many different views the way training
pipelines augment ImageNet: a random crop covering 10-100% of the photo with an
aspect ratio between 3:4 and 4:3, sometimes mirrored, scaled to a small JPEG.
The result is deterministic (seeded), so the committed files can be rebuilt
byte for byte:

    python -m pip download --no-deps scikit-image==0.26.0 -d build/wheels
    python -m infra.modelprep.derive_photos build/wheels/scikit_image-0.26.0-*.whl

Validation and calibration use *different source photos*, so an INT8 engine is
never graded on the images it was calibrated on. The text detector ships at FP32
and has no calibration set; it would need one (and a ``precision: int8``) to be
calibrated on TensorRT 10.x.
"""

from __future__ import annotations

import argparse
import io
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

MODELS = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True, slots=True)
class PhotoSet:
    """``count`` views of ``sources`` (names in ``skimage/data/``) written to ``folder``."""

    folder: Path
    sources: tuple[str, ...]
    count: int
    short_side: int
    min_area: float
    seed: int


# Only photos whose scikit-image docstring states a free licence (CC0, public domain,
# no known copyright restrictions); e.g. the Middlebury motorcycle pair states none.
_CLASSIFIER_VALIDATION = (
    "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
    "retina.jpg", "ihc.png",
)  # fmt: skip
_CLASSIFIER_CALIBRATION = ("brick.png", "grass.png", "gravel.png", "camera.png", "coins.png")
SETS = (
    PhotoSet(MODELS / "mobilenet_v2/1/validation", _CLASSIFIER_VALIDATION, 200, 224, 0.1, 1),
    PhotoSet(MODELS / "mobilenet_v2/1/calibration", _CLASSIFIER_CALIBRATION, 48, 224, 0.1, 2),
    PhotoSet(
        MODELS / "text_detector/1/validation",
        ("text.png", "rocket.jpg", "astronaut.png"),
        32,
        384,
        0.25,
        3,
    ),
)


def _view(photo: Image.Image, rng: random.Random, short_side: int, min_area: float) -> Image.Image:
    width, height = photo.size
    for _ in range(20):  # torchvision's RandomResizedCrop sampling
        area = width * height * rng.uniform(min_area, 1.0)
        ratio = rng.uniform(3 / 4, 4 / 3)
        w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        w, h = width, height
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    view = photo.crop((left, top, left + w, top + h))
    if rng.random() < 0.5:
        view = ImageOps.mirror(view)
    scale = short_side / min(w, h)
    return view.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )


def derive(wheel: Path, photo_set: PhotoSet) -> list[Path]:
    """Write the views of ``photo_set``; returns the files (previous ones are replaced)."""
    rng = random.Random(photo_set.seed)
    with zipfile.ZipFile(wheel) as archive:
        photos = [
            Image.open(io.BytesIO(archive.read(f"skimage/data/{name}"))).convert("RGB")
            for name in photo_set.sources
        ]
    photo_set.folder.mkdir(parents=True, exist_ok=True)
    for old in photo_set.folder.glob("*.jpg"):
        old.unlink()
    written = []
    for i in range(photo_set.count):
        index = i % len(photos)
        view = _view(photos[index], rng, photo_set.short_side, photo_set.min_area)
        stem = Path(photo_set.sources[index]).stem
        path = photo_set.folder / f"{i:03d}-{stem}.jpg"
        view.save(path, "JPEG", quality=80, optimize=True)
        written.append(path)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description="Derive validation and calibration photos.")
    parser.add_argument("wheel", type=Path, help="the scikit-image 0.26.0 wheel")
    args = parser.parse_args()
    for photo_set in SETS:
        files = derive(args.wheel, photo_set)
        size = sum(f.stat().st_size for f in files)
        print(f"{photo_set.folder}: {len(files)} images, {size / 1e6:.2f} MB")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
