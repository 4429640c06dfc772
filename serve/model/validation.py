"""Validation and calibration data for a model version.

The accuracy guard compares a reduced-precision engine with FP32 ONNX Runtime
on the ``validation/`` images, with the thresholds of the version's
``accuracy_guard`` config section; INT8 calibration (TensorRT 10.x, FP32 models)
reads the ``calibration/`` images, a different set, so that an engine is never
graded on the images it was calibrated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serve.engines.accuracy_guard import AccuracyGuard
from serve.engines.build import CalibrationSet, ValidationSet
from serve.imaging.cpu_decode import prepare_image, to_model_input
from serve.model.repository import CALIBRATION_DIR, ModelVersion
from serve.postprocess.base import ImageGeometry
from serve.postprocess.factory import make_postprocessor

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
MAX_VALIDATION_IMAGES = 256


def _images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:MAX_VALIDATION_IMAGES]


def validation_images(mv: ModelVersion) -> list[Path]:
    """Image files of the version's validation set (sorted; empty when there is none)."""
    return _images(mv.folder(mv.config.accuracy_guard.validation_dir))


def calibration_images(mv: ModelVersion) -> list[Path]:
    """Image files of the version's INT8 calibration set (sorted; empty when there is none)."""
    return _images(mv.folder(CALIBRATION_DIR))


def _batches(mv: ModelVersion, files: list[Path]) -> list[np.ndarray]:
    cfg = mv.config
    size = cfg.batching.max_batch_size
    pixels = [
        prepare_image(f.read_bytes(), cfg.input, cfg.preprocess, max_pixels=10**9).pixels
        for f in files
    ]
    return [
        to_model_input(np.stack(pixels[i : i + size]), cfg.input, cfg.preprocess)
        for i in range(0, len(pixels), size)
    ]


def validation_set(mv: ModelVersion, files: list[Path] | None = None) -> ValidationSet | None:
    """The guard's data and thresholds for ``mv`` (``files``, or the version's validation
    images), or ``None`` when there are no images."""
    files = validation_images(mv) if files is None else files
    if not files:
        return None
    postprocess = make_postprocessor(mv.config.postprocess)
    h, w = mv.config.input.height, mv.config.input.width
    # Reference and candidate are compared in the same (model-input) frame, so an
    # identity geometry is exact for this purpose.
    geometry = ImageGeometry(h, w, h, w, 1.0, 1.0)
    return ValidationSet(
        batches=_batches(mv, files),
        postprocess=lambda outputs: postprocess(outputs, geometry, mv.labels),
        guard=AccuracyGuard.from_spec(mv.config.accuracy_guard),
    )


def calibration_set(mv: ModelVersion, cache_dir: Path) -> CalibrationSet | None:
    """INT8 calibration batches from ``calibration/``, with a per-version calibration cache;
    ``None`` when the version has no calibration images (an INT8 build then fails, and
    the replica falls back to the next backend)."""
    files = calibration_images(mv)
    if not files:
        return None
    return CalibrationSet(
        batches=_batches(mv, files),
        cache_path=cache_dir / "calibration" / f"{mv.name}-{mv.version}.cache",
    )
