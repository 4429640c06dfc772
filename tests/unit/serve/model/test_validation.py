"""The classifier's validation set and its grading, with the real MobileNetV2 on the CPU:
a correct reduced-precision-like engine passes the shipped thresholds, a wrong one fails."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from infra.local.stack import DEFAULT_MODEL_REPOSITORY
from infra.modelprep.derive_photos import (
    CLASSIFIER_VALIDATION,
    GRID,
    PHOTOS,
    PROVENANCE,
    grid_views,
)
from infra.modelprep.guard_noise import (
    BROKEN,
    CORRECT,
    OrtEngine,
    Perturbation,
    load_version,
    logit_noise,
    measure_all,
)
from serve.engines.accuracy_guard import AccuracyGuard
from serve.model.validation import validation_images, validation_set
from serve.model_config import AccuracyGuardSpec

SOURCE = Path(__file__).resolve().parents[4] / "infra" / "models" / "mobilenet_v2" / "1"
FOLDER = SOURCE / "validation"
# Photos whose licence or subject made them unfit: microscopy, astronomy, textures.
NOT_NATURAL = {"hubble_deep_field", "retina", "ihc", "brick", "grass", "gravel", "text"}


def _provenance() -> list[dict[str, str]]:
    with (FOLDER / PROVENANCE).open(newline="") as rows:
        return list(csv.DictReader(rows))


# --- the shipped set ----------------------------------------------------------------------------


def test_every_validation_image_is_a_listed_view_of_a_licensed_natural_photo() -> None:
    rows = _provenance()
    files = sorted(p.name for p in FOLDER.glob("*.jpg"))
    assert sorted(r["file"] for r in rows) == files and len(files) == 256
    photos = {r["photo"] for r in rows}
    assert photos == set(CLASSIFIER_VALIDATION.sources) and not photos & NOT_NATURAL
    for row in rows:
        photo = PHOTOS[row["photo"]]
        assert (row["requirement"], row["member"], row["licence"]) == (
            photo.requirement,
            photo.member,
            photo.licence,
        )
        assert photo.licence and row["file"].startswith(f"{row['photo']}-")
    per_photo = {p: sum(r["photo"] == p for r in rows) for p in photos}
    assert set(per_photo.values()) == {32}  # every photo weighs the same


def test_grid_views_are_fixed_inside_the_photo_and_each_also_mirrored() -> None:
    views = grid_views(451, 300)
    assert views == grid_views(451, 300)  # no randomness
    assert len(views) == 2 * sum(len(anchors) for _, anchors in GRID) == 32
    for view in views:
        left, top, right, bottom = view.box
        assert 0 <= left < right <= 451 and 0 <= top < bottom <= 300
        assert (right - left) >= 0.5 * 451 - 1  # no tiny texture patches
    assert sum(v.mirrored for v in views) == 16
    assert len({v.box for v in views}) == 16
    assert views[0].box == (0, 0, 451, 300)


def test_the_validation_set_carries_the_configured_thresholds(tmp_path: Path) -> None:
    version = _version(tmp_path, images=4)
    config = (version / "config.yaml").read_text()
    assert "  min_top5_overlap: 0.85\n" in config
    (version / "config.yaml").write_text(
        config.replace("min_top5_overlap: 0.85", "min_top5_overlap: 0.5")
    )
    mv = load_version(version)
    data = validation_set(mv)
    assert data is not None and data.guard is not None
    assert data.guard == AccuracyGuard.from_spec(mv.config.accuracy_guard)
    assert data.guard.min_top5_overlap == 0.5 and data.guard != AccuracyGuard()
    assert sum(len(b) for b in data.batches) == len(validation_images(mv)) == 4
    assert validation_set(mv, []) is None


def test_the_shipped_thresholds_are_the_defaults_measured_for_them() -> None:
    assert load_version(SOURCE).config.accuracy_guard == AccuracyGuardSpec()


# --- grading with the real model ----------------------------------------------------------------


def _version(tmp_path: Path, images: int) -> Path:
    """The shipped config and labels, the built ``model.onnx`` and ``images`` views spread
    over every photo (every 8th file: 4 per photo for 32 images)."""
    model = DEFAULT_MODEL_REPOSITORY / "mobilenet_v2" / "1" / "model.onnx"
    if not model.is_file():
        pytest.fail(f"{model} is missing: run `make model` first")
    version = tmp_path / "mobilenet_v2" / "1"
    (version / "validation").mkdir(parents=True)
    for name in ("config.yaml", "labels.txt"):
        shutil.copy2(SOURCE / name, version / name)
    (version / "model.onnx").symlink_to(model)
    files = sorted(FOLDER.glob("*.jpg"))
    for path in files[:: len(files) // images][:images]:
        shutil.copy2(path, version / "validation" / path.name)
    return version


@pytest.fixture(scope="module")
def graded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, int, bool]]:
    """One pass of the real model per engine over 32 views, graded by the shipped config."""
    mv = load_version(_version(tmp_path_factory.mktemp("repo"), images=32))
    engines = (
        *[p for p in CORRECT if p.name in {"fp32-graph-optimised", "fp16-weights"}],
        Perturbation("small-logit-noise", lambda m, _: OrtEngine(m, transform=logit_noise(0.05))),
        *[p for p in BROKEN if p.name in {"int5-weights", "shuffled-labels"}],
    )
    return measure_all(mv, validation_images(mv), engines, calibrate=False)


@pytest.mark.parametrize("engine", ["fp32-graph-optimised", "fp16-weights", "small-logit-noise"])
def test_a_correct_reduced_precision_like_engine_passes(graded, engine: str) -> None:
    measures, confident, passed = graded[engine]
    assert passed, measures
    assert confident >= 10  # the natural photos give the grading confident images to use
    assert measures["logit_cosine"] > 0.99


@pytest.mark.parametrize("engine", ["int5-weights", "shuffled-labels"])
def test_a_wrong_engine_is_refused(graded, engine: str) -> None:
    measures, _, passed = graded[engine]
    assert not passed, measures
    assert measures["top1_confident"] < load_version(SOURCE).config.accuracy_guard.min_agreement
