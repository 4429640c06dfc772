"""Assembling the local model repository (``make model``).

``build/model-repository/<model>/<version>/`` gets the committed config, labels,
``validation/`` photos (the accuracy guard's) and ``calibration/`` photos (INT8)
from ``infra/models/`` and the ONNX file produced from packaged weights. Every
step is skipped when its output is already there, so repeated runs are cheap.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from infra.modelprep.mobilenet_v2 import export_mobilenet_v2

logger = logging.getLogger(__name__)

INFRA = Path(__file__).resolve().parent.parent
MODEL_SOURCES = INFRA / "models"


def _copy_sources(model: str, version: str, target: Path) -> None:
    """Config, labels and the photo folders; folders are replaced, so photos removed from
    a committed set do not linger in the repository."""
    source = MODEL_SOURCES / model / version
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)
        elif path.is_dir():
            shutil.rmtree(target / path.name, ignore_errors=True)
            shutil.copytree(path, target / path.name)


def prepare_repository(out: Path, wheel_cache: Path, progress=logger.info) -> list[Path]:  # noqa: ANN001
    """Build every model version into ``out``; returns the version directories."""
    from infra.modelprep.text_detector import prepare_text_detector

    out.mkdir(parents=True, exist_ok=True)
    mobilenet = out / "mobilenet_v2" / "1"
    _copy_sources("mobilenet_v2", "1", mobilenet)
    if not (mobilenet / "model.onnx").is_file():
        progress("exporting MobileNetV2 (ImageNet weights) to ONNX")
        export_mobilenet_v2(mobilenet / "model.onnx")
    progress("preparing the text detector from the rapidocr-onnxruntime wheel")
    detector = prepare_text_detector(out, wheel_cache)
    return [mobilenet, detector]


def main() -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the local model repository.")
    parser.add_argument("out", type=Path, nargs="?", default=Path("build/model-repository"))
    parser.add_argument("--wheel-cache", type=Path, default=Path("build/wheels"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in prepare_repository(args.out, args.wheel_cache):
        logger.info("ready: %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
