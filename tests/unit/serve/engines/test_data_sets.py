"""The committed validation and calibration photos, and how engines read them."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from serve.engines.base import EngineCompatibility, HardwareCompatibility
from serve.model.loader import engine_spec
from serve.model.repository import ModelVersion
from serve.model.validation import calibration_set, validation_images
from serve.model_config import load_model_config, parse_model_config

MODELS = Path(__file__).resolve().parents[4] / "infra" / "models"


def _digests(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.jpg")}


def test_the_classifier_has_hundreds_of_validation_photos_distinct_from_calibration() -> None:
    version = MODELS / "mobilenet_v2" / "1"
    validation, calibration = _digests(version / "validation"), _digests(version / "calibration")
    assert len(validation) >= 256 and len(calibration) >= 32
    assert not validation & calibration
    # validation: PHOTO-NN.jpg (fixed grid views); calibration: NNN-PHOTO.jpg (random views)
    sources = {p.stem.rsplit("-", 1)[0] for p in (version / "validation").glob("*.jpg")}
    calibration_sources = {p.stem.split("-", 1)[1] for p in (version / "calibration").glob("*.jpg")}
    assert len(sources) >= 8 and len(calibration_sources) >= 5
    assert not sources & calibration_sources  # cut from different photos, not just crops
    size = sum(p.stat().st_size for p in MODELS.rglob("*.jpg"))
    assert size < 5_000_000


def test_calibration_reads_the_calibration_folder_not_the_validation_one(tmp_path) -> None:
    version = tmp_path / "mobilenet_v2" / "1"
    shutil.copytree(MODELS / "mobilenet_v2" / "1", version)
    mv = ModelVersion("mobilenet_v2", "1", load_model_config(version / "config.yaml"), version, ())
    calibration = calibration_set(mv, tmp_path / "work")
    assert calibration is not None
    assert sum(len(b) for b in calibration.batches) == len(
        list((version / "calibration").glob("*"))
    )
    assert len(validation_images(mv)) == 256
    shutil.rmtree(version / "calibration")
    assert calibration_set(mv, tmp_path / "work") is None


def test_config_yaml_sets_the_tensorrt_compatibility_options(tmp_path) -> None:
    raw = {
        "task": "classification",
        "input": {"height": 8, "width": 8},
        "postprocess": {"kind": "classification"},
        "tensorrt": {"version_compatible": True, "hardware_compatibility": "ampere_plus"},
    }
    config = parse_model_config(raw, source="config.yaml")
    spec = engine_spec(ModelVersion("m", "1", config, tmp_path, ()), ("logits",))
    assert spec.compatibility == EngineCompatibility(
        version_compatible=True, hardware=HardwareCompatibility.AMPERE_PLUS
    )
    default = parse_model_config({k: v for k, v in raw.items() if k != "tensorrt"}, "c.yaml")
    assert engine_spec(ModelVersion("m", "1", default, tmp_path, ()), ()).compatibility.is_default
