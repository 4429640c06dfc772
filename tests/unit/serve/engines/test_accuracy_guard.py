"""The accuracy guard: reduced precision must agree with FP32 ONNX Runtime, or it is refused."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping

import numpy as np
import pytest

from serve.engines.accuracy_guard import (
    AccuracyGuard,
    AccuracyGuardError,
    box_agreement,
    iou,
    top1_agrees,
)
from serve.engines.onnxruntime import OnnxRuntimeEngine
from serve.engines.tensorrt import TensorRTEngine, build_serialized_engine
from serve.model_config import AccuracyGuardSpec, Precision
from shared.results import Detection, Label
from tests.unit.serve.engines.onnx_models import classifier_onnx, images


def _label(class_id: int, score: float) -> Label:
    return Label(class_id=class_id, label=f"c{class_id}", score=score)


def _box(y0: float, x0: float, y1: float, x1: float, cls: int = 1, score: float = 0.9) -> Detection:
    return Detection(ymin=y0, xmin=x0, ymax=y1, xmax=x1, score=score, class_id=cls, label=f"c{cls}")


def top5(outputs: Mapping[str, np.ndarray]) -> list[Label]:
    logits = outputs["logits"]
    order = np.argsort(-logits)[:5]
    return [_label(int(i), float(logits[i])) for i in order]


VALIDATION = [images(16, seed=100 + i) for i in range(4)]  # 64 images


# --- matching rules ---------------------------------------------------------------------------


def test_iou() -> None:
    assert iou(_box(0, 0, 1, 1), _box(0, 0, 1, 1)) == pytest.approx(1.0)
    assert iou(_box(0, 0, 0.5, 1), _box(0.5, 0, 1, 1)) == pytest.approx(0.0)
    assert iou(_box(0, 0, 1, 1), _box(0, 0, 1, 0.5)) == pytest.approx(0.5)


def test_top1_agreement() -> None:
    assert top1_agrees([_label(3, 0.9), _label(1, 0.1)], [_label(1, 0.2), _label(3, 0.8)])
    assert not top1_agrees([_label(3, 0.9)], [_label(1, 0.9)])
    assert top1_agrees([], [])
    assert not top1_agrees([_label(3, 0.9)], [])


def test_box_agreement_rules() -> None:
    ref = [_box(0, 0, 0.5, 0.5), _box(0.5, 0.5, 1, 1, cls=2)]
    assert box_agreement(ref, ref, 0.5) == 1.0
    assert box_agreement(ref, [_box(0, 0, 0.5, 0.5)], 0.5) == 0.5
    assert (
        box_agreement(ref, [_box(0, 0, 0.5, 0.5, cls=7), _box(0.5, 0.5, 1, 1, cls=2)], 0.5) == 0.5
    )
    assert box_agreement([_box(0, 0, 1, 1)], [_box(0, 0, 1, 0.4)], 0.5) == 0.0  # IoU 0.4
    # one candidate cannot match two reference boxes
    assert box_agreement([_box(0, 0, 1, 1), _box(0, 0, 1, 1)], [_box(0, 0, 1, 1)], 0.5) == 0.5
    assert box_agreement([], [], 0.5) == 1.0
    assert box_agreement([], [_box(0, 0, 1, 1)], 0.5) == 0.0


def test_guard_parameters_are_validated() -> None:
    guard = AccuracyGuard.from_spec(AccuracyGuardSpec(min_agreement=0.9, iou_match=0.6))
    assert (guard.min_agreement, guard.iou_match) == (0.9, 0.6)
    with pytest.raises(ValueError, match="min_agreement"):
        AccuracyGuard(min_agreement=1.5)
    with pytest.raises(ValueError, match="iou_match"):
        AccuracyGuard(iou_match=0.0)


# --- classifiers through the fake TensorRT ----------------------------------------------------


@pytest.fixture
def reference(spec) -> Iterator[OnnxRuntimeEngine]:
    engine = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    yield engine
    engine.close()


def test_fp16_engine_agrees_and_passes(spec, fake_gpu, reference) -> None:
    plan = build_serialized_engine(spec, classifier_onnx(), precision=Precision.FP16)
    candidate = TensorRTEngine.from_serialized(spec, plan, precision=Precision.FP16)
    verdict = AccuracyGuard(min_agreement=0.98).check(
        candidate, reference, VALIDATION, top5, model="tiny", version="1", precision="fp16"
    )
    assert verdict.passed and verdict.metric == "top1" and verdict.images == 64
    assert verdict.agreement >= 0.98 and verdict.threshold == 0.98
    candidate.close()


def test_badly_calibrated_int8_engine_is_refused_loudly(spec, fake_gpu, reference, caplog) -> None:
    tiny_range = [images(8, seed=7) * 0.001]  # calibration data unlike real inputs
    plan = build_serialized_engine(
        spec, classifier_onnx(), precision=Precision.INT8, calibration_batches=tiny_range
    )
    candidate = TensorRTEngine.from_serialized(spec, plan, precision=Precision.INT8)
    with caplog.at_level(logging.ERROR), pytest.raises(AccuracyGuardError) as err:
        AccuracyGuard(min_agreement=0.98).check(
            candidate, reference, VALIDATION, top5, model="tiny", version="1", precision="int8"
        )
    verdict = err.value.verdict
    assert verdict is not None and not verdict.passed and verdict.agreement < 0.5
    message = str(err.value)
    for part in ("tiny/1", "int8", f"{verdict.agreement:.4f}", "0.9800", "64 images"):
        assert part in message
    assert any(
        r.levelno == logging.ERROR and "refuses tiny/1" in r.getMessage() for r in caplog.records
    )
    candidate.close()


class Perturbed:
    """Wraps an engine and adds noise to its outputs (a stand-in for a broken engine)."""

    backend_name = "perturbed"

    def __init__(self, inner: OnnxRuntimeEngine, scale: float) -> None:
        self.inner, self.scale = inner, scale
        self.rng = np.random.default_rng(0)

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        out = self.inner.infer(batch)
        return {
            k: v + self.rng.normal(0, self.scale, v.shape).astype(v.dtype) for k, v in out.items()
        }

    def close(self) -> None:
        pass


def test_agreement_is_measured_not_assumed(reference) -> None:
    guard = AccuracyGuard(min_agreement=0.98)
    agreement, count, metric = guard.measure(reference, reference, VALIDATION, top5)
    assert (agreement, count, metric) == (1.0, 64, "top1")
    noisy, _, _ = guard.measure(Perturbed(reference, 5.0), reference, VALIDATION, top5)
    assert noisy < 0.6
    with pytest.raises(AccuracyGuardError, match="below the threshold"):
        guard.check(
            Perturbed(reference, 5.0),
            reference,
            VALIDATION,
            top5,
            model="m",
            version="2",
            precision="fp16",
        )


def test_empty_validation_set_is_refused(reference) -> None:
    with pytest.raises(AccuracyGuardError, match="validation set is empty"):
        AccuracyGuard().check(
            reference, reference, [], top5, model="m", version="1", precision="fp16"
        )


# --- detectors, with hand-made boxes ----------------------------------------------------------


class BoxEngine:
    """Returns fixed boxes per image; image i of a batch is identified by ``batch[i, 0]``."""

    backend_name = "boxes"

    def __init__(self, per_image: list[list[Detection]]) -> None:
        self.per_image = per_image

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        rows = [self.per_image[int(i)] for i in batch[:, 0]]
        boxes = np.zeros((len(rows), 4, 4), np.float32)
        scores = np.zeros((len(rows), 4), np.float32)
        classes = np.zeros((len(rows), 4), np.int64)
        for r, dets in enumerate(rows):
            for j, d in enumerate(dets):
                boxes[r, j] = (d.ymin, d.xmin, d.ymax, d.xmax)
                scores[r, j], classes[r, j] = d.score, d.class_id
        return {"boxes": boxes, "scores": scores, "classes": classes}

    def close(self) -> None:
        pass


def detections(outputs: Mapping[str, np.ndarray]) -> list[Detection]:
    return [
        _box(
            *map(float, outputs["boxes"][j]),
            cls=int(outputs["classes"][j]),
            score=float(outputs["scores"][j]),
        )
        for j in range(len(outputs["scores"]))
        if outputs["scores"][j] > 0.3
    ]


REFERENCE_BOXES = [
    [_box(0.1, 0.1, 0.5, 0.5), _box(0.6, 0.6, 0.9, 0.9, cls=2)],
    [_box(0.2, 0.2, 0.8, 0.8, cls=3)],
    [],  # nothing to find: agreeing means finding nothing
    [_box(0.0, 0.0, 1.0, 1.0, cls=4)],
]
BATCH = np.arange(4, dtype=np.float32).reshape(4, 1)


def test_detector_with_jittered_boxes_passes() -> None:
    jittered = [
        [
            _box(d.ymin + 0.01, d.xmin, d.ymax + 0.01, d.xmax, d.class_id, d.score * 0.97)
            for d in img
        ]
        for img in REFERENCE_BOXES
    ]
    verdict = AccuracyGuard(min_agreement=0.98, iou_match=0.5).check(
        BoxEngine(jittered),
        BoxEngine(REFERENCE_BOXES),
        [BATCH],
        detections,
        model="det",
        version="3",
        precision="fp16",
    )
    assert verdict.passed and verdict.metric == "box_match" and verdict.agreement == 1.0


def test_detector_with_shifted_or_spurious_boxes_is_refused() -> None:
    shifted = [
        [_box(0.3, 0.3, 0.7, 0.7), _box(0.6, 0.6, 0.9, 0.9, cls=2)],  # first box IoU ~0.14
        [_box(0.2, 0.2, 0.8, 0.8, cls=3)],
        [_box(0.4, 0.4, 0.6, 0.6, cls=1)],  # spurious box where there is nothing
        [_box(0.0, 0.0, 1.0, 1.0, cls=5)],  # wrong class
    ]
    with pytest.raises(AccuracyGuardError) as err:
        AccuracyGuard(min_agreement=0.9).check(
            BoxEngine(shifted),
            BoxEngine(REFERENCE_BOXES),
            [BATCH],
            detections,
            model="det",
            version="3",
            precision="int8",
        )
    verdict = err.value.verdict
    assert verdict is not None and verdict.metric == "box_match"
    assert verdict.agreement == pytest.approx((0.5 + 1.0 + 0.0 + 0.0) / 4)
    assert "det/3 at int8" in str(err.value) and "0.3750" in str(err.value)
