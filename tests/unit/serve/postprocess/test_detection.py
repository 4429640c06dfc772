"""SSD- and YOLO-style postprocessing, end to end through ONNX Runtime with known outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve.model_config import SsdPost, YoloPost
from serve.postprocess.base import ImageGeometry
from serve.postprocess.detection import SsdDetections, YoloDetections
from shared.errors import ConfigError
from shared.results import Detection
from tests.unit.serve.postprocess._onnx_models import constant_model, run_per_image

LABELS = ["person", "bicycle", "car"]
# A 200x400 (h x w) photo, centre-cropped to 100x100 at scale 1: input = original - (50, 150).
CENTER_CROP = ImageGeometry(200, 400, 100, 100, 1.0, 1.0, -50.0, -150.0)
# A 480x960 photo letterboxed into 640x640: scale 2/3, 160 rows of padding on top.
LETTERBOX = ImageGeometry(480, 960, 640, 640, 320 / 480, 640 / 960, 160.0, 0.0)
# Input = original: nothing is cropped or padded away.
IDENTITY_640 = ImageGeometry(640, 640, 640, 640, 1.0, 1.0)


def boxes_of(detections: list[Detection]) -> list[tuple[float, ...]]:
    return [(d.ymin, d.xmin, d.ymax, d.xmax) for d in detections]


def assert_boxes(detections: list[Detection], expected: list[tuple[float, ...]]) -> None:
    assert len(detections) == len(expected)
    for got, want in zip(boxes_of(detections), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


# --- SSD ---------------------------------------------------------------------------------

SSD_BOXES = np.array(
    [
        [0.1, 0.2, 0.3, 0.4],  # 0.9 class 1 -> person
        [0.5, 0.5, 0.9, 0.7],  # 0.6 class 3 -> car
        [0.0, 0.0, 0.2, 0.2],  # 0.2: below the threshold
        [0.4, 0.1, 0.6, 0.3],  # 0.75 class 2 -> bicycle
        [0.0, 0.0, 1.0, 1.0],  # 0.99 but beyond num_detections
    ],
    np.float32,
)
SSD_SCORES = np.array([0.9, 0.6, 0.2, 0.75, 0.99], np.float32)
SSD_CLASSES = np.array([1, 3, 2, 2, 1], np.float32)
SSD_SPEC = SsdPost(score_threshold=0.3, class_offset=-1)


@pytest.fixture(scope="module")
def ssd_outputs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, np.ndarray]]:
    path = constant_model(
        tmp_path_factory.mktemp("ssd") / "ssd.onnx",
        {
            "detection_boxes": SSD_BOXES,
            "detection_scores": SSD_SCORES,
            "detection_classes": SSD_CLASSES,
            "num_detections": np.array(4, np.float32),
        },
        scaled_by_input=["detection_scores"],
        input_chw=(3, 100, 100),
    )
    batch = np.stack([np.ones((3, 100, 100)), np.full((3, 100, 100), 0.45)])
    return run_per_image(path, batch, SsdDetections(SSD_SPEC).output_names)


def test_ssd_maps_normalized_boxes_through_a_center_crop(ssd_outputs: list) -> None:
    found = SsdDetections(SSD_SPEC)(ssd_outputs[0], CENTER_CROP, LABELS)

    # input px (10, 20, 30, 40) -> original (60, 170, 80, 190) of 200 x 400, etc.
    assert_boxes(found, [(0.3, 0.425, 0.4, 0.475), (0.45, 0.4, 0.55, 0.45), (0.5, 0.5, 0.7, 0.55)])
    assert [d.score for d in found] == pytest.approx([0.9, 0.75, 0.6])
    assert [(d.class_id, d.label) for d in found] == [(0, "person"), (1, "bicycle"), (2, "car")]


def test_ssd_outputs_are_split_per_image_of_the_batch(ssd_outputs: list) -> None:
    found = SsdDetections(SSD_SPEC)(ssd_outputs[1], CENTER_CROP, LABELS)

    # Scores scaled by 0.45: 0.405, 0.3375 stay above 0.3, 0.27 does not.
    assert [d.label for d in found] == ["person", "bicycle"]
    assert [d.score for d in found] == pytest.approx([0.405, 0.3375])


def test_ssd_pixel_xyxy_boxes_without_count_capped_at_max_detections() -> None:
    spec = SsdPost(box_format="xyxy", boxes_normalized=False, count=None, max_detections=2)
    outputs = {
        "detection_boxes": np.array([[20, 10, 40, 30], [0, 0, 100, 100], [50, 50, 60, 60]]),
        "detection_scores": np.array([0.5, 0.4, 0.8]),
        "detection_classes": np.array([0, 7, 2], np.int64),
    }

    found = SsdDetections(spec)(outputs, CENTER_CROP, LABELS)

    assert_boxes(found, [(0.5, 0.5, 0.55, 0.525), (0.3, 0.425, 0.4, 0.475)])
    assert [(d.class_id, d.label) for d in found] == [(2, "car"), (0, "person")]


def test_ssd_count_above_capacity_and_unknown_class_get_a_fallback_label() -> None:
    outputs = {
        "detection_boxes": SSD_BOXES[:1],
        "detection_scores": SSD_SCORES[:1],
        "detection_classes": np.array([41.0]),
        "num_detections": np.array([100.0]),
    }

    found = SsdDetections(SsdPost())(outputs, CENTER_CROP, LABELS)

    assert [(d.class_id, d.label) for d in found] == [(41, "class_41")]


def test_ssd_missing_output_names_it_and_the_outputs_that_exist() -> None:
    outputs = {"boxes": SSD_BOXES, "detection_scores": SSD_SCORES, "detection_classes": SSD_CLASSES}

    with pytest.raises(ConfigError, match=r"'detection_boxes'.*\['boxes', 'detection_classes'"):
        SsdDetections(SsdPost(count=None))(outputs, CENTER_CROP, LABELS)


def test_ssd_rejects_boxes_of_the_wrong_shape() -> None:
    outputs = {
        "detection_boxes": np.zeros((5, 3)),
        "detection_scores": np.zeros(5),
        "detection_classes": np.zeros(5),
    }

    with pytest.raises(ConfigError, match=r"\(5, 3\)"):
        SsdDetections(SsdPost(count=None))(outputs, CENTER_CROP, LABELS)


# --- YOLO --------------------------------------------------------------------------------

# One row per anchor: cx, cy, w, h, then class scores (3 classes), in 640x640 input pixels.
YOLO_ANCHORS = np.array(
    [
        [100, 300, 50, 50, 0.9, 0.05, 0.01],  # A0 kept
        [105, 300, 50, 50, 0.8, 0.1, 0.0],  # A1 IoU 0.82 with A0, same class: suppressed
        [105, 300, 50, 50, 0.1, 0.7, 0.0],  # A2 same box, class 1: survives per-class NMS
        [400, 400, 100, 60, 0.0, 0.0, 0.6],  # A3 alone
        [300, 250, 20, 20, 0.1, 0.1, 0.1],  # A4 below the score threshold
        [140, 300, 50, 50, 0.5, 0.0, 0.0],  # A5 IoU 0.11 with A0: kept
        [300, 50, 40, 40, 0.0, 0.95, 0.0],  # A6 entirely in the letterbox padding
    ],
    np.float32,
)
# Relative to the 480x960 original: y = (y_in - 160) / 320, x = x_in / 640.
A0 = (0.359375, 0.1171875, 0.515625, 0.1953125)
A2 = (0.359375, 0.125, 0.515625, 0.203125)
A3 = (0.65625, 0.546875, 0.84375, 0.703125)
A5 = (0.359375, 0.1796875, 0.515625, 0.2578125)


@pytest.fixture(scope="module")
def yolov8_output(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    path = constant_model(
        tmp_path_factory.mktemp("yolo") / "yolov8.onnx", {"output0": YOLO_ANCHORS.T.copy()}
    )
    return run_per_image(path, np.ones((1, 3, 32, 32)), ("output0",))[0]


def test_yolo_per_class_nms_through_a_letterbox(yolov8_output: dict) -> None:
    found = YoloDetections(YoloPost())(yolov8_output, LETTERBOX, LABELS)

    assert_boxes(found, [A0, A2, A3, A5])
    assert [d.score for d in found] == pytest.approx([0.9, 0.7, 0.6, 0.5])
    assert [d.label for d in found] == ["person", "bicycle", "car", "person"]


def test_yolo_class_agnostic_nms_suppresses_across_classes(yolov8_output: dict) -> None:
    found = YoloDetections(YoloPost(class_agnostic_nms=True))(yolov8_output, LETTERBOX, LABELS)

    assert_boxes(found, [A0, A3, A5])


def test_yolo_max_detections_keeps_the_best(yolov8_output: dict) -> None:
    found = YoloDetections(YoloPost(max_detections=3))(yolov8_output, IDENTITY_640, LABELS)

    # A6 (0.95) is inside the image here, unlike in the letterbox.
    assert [d.score for d in found] == pytest.approx([0.95, 0.9, 0.7])


def test_boxes_lost_in_letterbox_padding_do_not_use_up_the_cap(yolov8_output: dict) -> None:
    found = YoloDetections(YoloPost(max_detections=3))(yolov8_output, LETTERBOX, LABELS)

    assert_boxes(found, [A0, A2, A3])


def test_yolov5_anchors_first_with_objectness(tmp_path: Path) -> None:
    objectness = np.array([1.0, 1.0, 1.0, 0.3, 1.0, 1.0, 1.0], np.float32)[:, None]
    rows = np.concatenate([YOLO_ANCHORS[:, :4], objectness, YOLO_ANCHORS[:, 4:]], axis=1)
    path = constant_model(tmp_path / "yolov5.onnx", {"output": rows})
    outputs = run_per_image(path, np.ones((1, 3, 32, 32)), ("output",))[0]
    spec = YoloPost(output="output", layout="anchors_first", has_objectness=True)

    found = YoloDetections(spec)(outputs, LETTERBOX, LABELS)

    # A3 drops out: 0.6 class score x 0.3 objectness = 0.18 < 0.25.
    assert_boxes(found, [A0, A2, A5])
    assert [d.score for d in found] == pytest.approx([0.9, 0.7, 0.5])


def test_yolo_with_nothing_above_threshold_finds_nothing(yolov8_output: dict) -> None:
    assert YoloDetections(YoloPost(score_threshold=0.99))(yolov8_output, LETTERBOX, LABELS) == []


def test_yolo_missing_output_names_it_and_the_outputs_that_exist(yolov8_output: dict) -> None:
    with pytest.raises(ConfigError, match=r"'boxes'.*\['output0'\]"):
        YoloDetections(YoloPost(output="boxes"))(yolov8_output, LETTERBOX, LABELS)


def test_yolo_output_without_class_scores_is_rejected() -> None:
    spec = YoloPost(layout="anchors_first", has_objectness=True)

    with pytest.raises(ConfigError, match=r"\(10, 5\)"):
        YoloDetections(spec)({"output0": np.zeros((10, 5))}, LETTERBOX, LABELS)


def test_yolo_end_to_end_from_image_bytes_through_a_letterbox(tmp_path: Path) -> None:
    import io

    from PIL import Image

    from serve.imaging.cpu_decode import prepare_image, to_model_input
    from serve.model_config import InputSpec, PreprocessSpec

    buffer = io.BytesIO()
    Image.new("RGB", (200, 100), (90, 120, 30)).save(buffer, format="PNG")
    input_spec = InputSpec(name="images", height=64, width=64)
    pre = PreprocessSpec(resize="letterbox")
    prepared = prepare_image(buffer.getvalue(), input_spec, pre, max_pixels=10**6)
    # 100x200 into 64x64: scale 0.32 -> 32x64 content below 16 rows of padding.
    # Anchor boxes (cx, cy, w, h): the central half of the photo, and the whole content area.
    rows = np.array([[32, 32, 32, 16, 0.8, 0.0], [32, 32, 64, 32, 0.0, 0.6]], np.float32)
    path = constant_model(tmp_path / "yolo.onnx", {"output0": rows.T.copy()}, input_chw=(3, 64, 64))
    batch = to_model_input(prepared.pixels[None], input_spec, pre)

    outputs = run_per_image(path, batch, ("output0",))[0]
    found = YoloDetections(YoloPost())(outputs, prepared.geometry, ["a", "b"])

    assert_boxes(found, [(0.25, 0.25, 0.75, 0.75), (0.0, 0.0, 1.0, 1.0)])
    assert [d.label for d in found] == ["a", "b"]
