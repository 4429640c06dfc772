"""The real text detector (PP-OCRv4 DBNet from the rapidocr-onnxruntime wheel) on real pixels.

The wheel comes from PyPI on the first run and is cached in ``build/wheels/``.
Two images go through the serving path in one batch (``prepare_image`` ->
``to_model_input`` -> ONNX Runtime -> ``MaskDetections``):

* ``infra/samples/text.jpg``: scikit-image's ``text`` sample, handwritten maths on
  slanted ruled paper, blurred. Its dark pixels include ruled lines and long
  strokes that no text detector boxes, so the checks there are that boxes sit on
  ink (ink is several times denser inside them than on average) without covering
  the page, not that all ink is covered.
* printed text rendered here, where the ink is exactly the text: nearly all of it
  must be inside the boxes, with one box per line.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from infra.modelprep import text_detector
from infra.modelprep.text_detector import (
    ModelPrepError,
    check_config_fits_model,
    prepare_text_detector,
)
from serve.engines.base import EngineSpec
from serve.engines.onnxruntime import OnnxRuntimeEngine
from serve.imaging.cpu_decode import prepare_image, to_model_input
from serve.model_config import InputSpec, ModelConfig, Task, load_model_config
from serve.postprocess.detection import MaskDetections
from serve.postprocess.factory import make_postprocessor
from shared.results import Detection

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WHEEL_CACHE = REPO_ROOT / "build" / "wheels"
PHOTO = REPO_ROOT / "infra" / "samples" / "text.jpg"
LINES = ("Triggerfish reads text", "in photos: 42 boxes", "Event driven inference")
LINE_TOP, LINE_STEP = 40, 100


@pytest.fixture(scope="module")
def version_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_text_detector(tmp_path_factory.mktemp("repository"), WHEEL_CACHE)


@pytest.fixture(scope="module")
def config(version_dir: Path) -> ModelConfig:
    return load_model_config(version_dir / "config.yaml")


@pytest.fixture(scope="module")
def engine(version_dir: Path, config: ModelConfig) -> Iterator[OnnxRuntimeEngine]:
    spec = EngineSpec(
        model="text_detector",
        version="1",
        onnx_path=version_dir / "model.onnx",
        input_name=config.input.name,
        input_shape=(3, config.input.height, config.input.width),
        input_dtype=config.input.dtype,
        output_names=MaskDetections(config.postprocess).output_names,  # type: ignore[arg-type]
        batch_sizes=config.batching.engine_batch_sizes,
    )
    loaded = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    yield loaded
    loaded.close()


def rendered_text() -> tuple[bytes, np.ndarray]:
    """Three lines of printed text on paper-coloured background: PNG bytes and the ink mask."""
    image = Image.new("RGB", (640, 360), (235, 232, 225))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=34)
    for i, line in enumerate(LINES):
        draw.text((40, LINE_TOP + i * LINE_STEP), line, fill=(20, 20, 20), font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue(), np.asarray(image.convert("L")) < 128


@pytest.fixture(scope="module")
def detections(config: ModelConfig, engine: OnnxRuntimeEngine) -> dict[str, list[Detection]]:
    images = {"photo": PHOTO.read_bytes(), "rendered": rendered_text()[0]}
    prepared = [
        prepare_image(data, config.input, config.preprocess, max_pixels=10**8)
        for data in images.values()
    ]
    batch = to_model_input(np.stack([p.pixels for p in prepared]), config.input, config.preprocess)
    outputs = engine.infer(batch)
    postprocess = make_postprocessor(config.postprocess)
    return {
        name: postprocess({k: v[i] for k, v in outputs.items()}, p.geometry, [])
        for i, (name, p) in enumerate(zip(images, prepared, strict=True))
    }


def box_mask(found: list[Detection], height: int, width: int) -> np.ndarray:
    """Pixels of a ``height`` x ``width`` image inside any detected box."""
    inside = np.zeros((height, width), dtype=bool)
    for d in found:
        rows = slice(int(d.ymin * height), int(np.ceil(d.ymax * height)))
        inside[rows, int(d.xmin * width) : int(np.ceil(d.xmax * width))] = True
    return inside


def test_repository_entry_is_complete_and_valid(version_dir: Path, config: ModelConfig) -> None:
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "SOURCES.md",
        "config.yaml",
        "model.onnx",
        "validation",
    ]
    assert (version_dir / "validation" / "text.jpg").read_bytes() == PHOTO.read_bytes()
    assert config.task is Task.DETECTION and config.postprocess.kind == "mask"
    assert config.labels is None
    assert config.batching.engine_batch_sizes == (1, 2, 4)
    assert [b.value for b in config.backends] == ["onnxruntime", "tensorrt"]


def test_preparing_again_reuses_the_wheel_and_the_files(version_dir: Path) -> None:
    wheel = WHEEL_CACHE / text_detector.WHEEL_FILE
    before = {p: p.stat().st_mtime_ns for p in (wheel, *version_dir.rglob("*"))}

    again = prepare_text_detector(version_dir.parent.parent, WHEEL_CACHE)

    assert again == version_dir
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_corrupted_model_is_replaced(tmp_path: Path, version_dir: Path) -> None:
    target = tmp_path / "text_detector" / "1"
    target.mkdir(parents=True)
    (target / "model.onnx").write_bytes(b"truncated")

    prepare_text_detector(tmp_path, WHEEL_CACHE)

    assert (target / "model.onnx").read_bytes() == (version_dir / "model.onnx").read_bytes()


def test_a_config_naming_the_wrong_input_is_refused(version_dir: Path, config: ModelConfig) -> None:
    wrong = config.model_copy(update={"input": InputSpec(name="images", height=960, width=960)})

    with pytest.raises(ModelPrepError, match=r"'images'.*\['x'\]"):
        check_config_fits_model(wrong, version_dir / "model.onnx")


def test_photo_boxes_sit_on_the_handwriting(detections: dict[str, list[Detection]]) -> None:
    found = detections["photo"]
    gray = np.asarray(Image.open(PHOTO).convert("L"))
    ink = gray < 80  # pen strokes and ruled lines; the paper is 100-200
    inside = box_mask(found, *gray.shape)
    covered = ink[inside].sum() / ink.sum()

    assert len(found) >= 5  # measured: 9 regions of formula
    assert inside.mean() <= 0.35  # measured: 0.22 of the photo
    assert covered >= 0.4  # measured: 0.52
    assert covered / inside.mean() >= 1.8  # ink is 2.3x denser inside boxes than overall
    for d in found:
        region = ink[box_mask([d], *gray.shape)]
        assert region.mean() >= 0.03, f"box without ink: {d}"  # measured: >= 0.07 each
        assert 0.3 < d.score <= 1.0 and d.label == "text"


def test_printed_text_is_covered_line_by_line(detections: dict[str, list[Detection]]) -> None:
    found = detections["rendered"]
    ink = rendered_text()[1]
    inside = box_mask(found, *ink.shape)

    assert len(LINES) <= len(found) <= 3 * len(LINES)  # one box per line or per word
    assert inside.mean() <= 0.25  # measured: 0.12
    assert ink[inside].sum() / ink.sum() >= 0.9  # measured: 0.98
    for i in range(len(LINES)):
        band = slice(LINE_TOP + i * LINE_STEP - 10, LINE_TOP + (i + 1) * LINE_STEP - 10)
        line_ink = ink[band]
        assert line_ink[inside[band]].sum() / line_ink.sum() >= 0.8, LINES[i]
