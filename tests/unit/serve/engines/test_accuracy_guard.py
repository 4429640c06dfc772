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
    output_cosine,
    top1_agrees,
    top1_margin,
    topk_overlap,
)
from serve.engines.build import ValidationSet, build_engine
from serve.engines.cache import DiskEngineStore, EngineCache
from serve.engines.onnxruntime import OnnxRuntimeEngine
from serve.engines.tensorrt import TensorRTEngine, build_serialized_engine
from serve.model_config import AccuracyGuardSpec, Backend, Precision, parse_model_config
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


def test_top1_margin_and_topk_overlap() -> None:
    assert top1_margin([_label(1, 0.3), _label(2, 0.6)]) == pytest.approx(0.3)
    assert top1_margin([_label(1, 0.9)]) == float("inf")
    assert top1_margin([]) == 0.0
    ref = [_label(i, 0.5 - i / 10) for i in range(5)]
    assert topk_overlap(ref, list(reversed(ref))) == 1.0  # order within the top-k is noise
    assert topk_overlap(ref, [_label(i, 0.1) for i in (0, 1, 2, 7, 8)]) == pytest.approx(0.6)
    assert topk_overlap([], []) == 1.0 and topk_overlap([], ref) == 0.0


def test_output_cosine_ignores_a_shift_and_sees_a_permutation() -> None:
    logits = np.linspace(-3.0, 5.0, 100, dtype=np.float32)
    assert output_cosine({"logits": logits}, {"logits": logits + 7.0}) == pytest.approx(1.0)
    assert output_cosine({"logits": logits}, {"logits": logits * 1.1}) == pytest.approx(1.0)
    shuffled = np.random.default_rng(0).permutation(logits)
    assert output_cosine({"logits": logits}, {"logits": shuffled}) < 0.3
    assert output_cosine({"ids": np.arange(3)}, {"ids": np.zeros(3, np.int64)}) == 1.0  # no floats
    flat = np.zeros(4, np.float32)
    assert output_cosine({"x": flat}, {"x": flat}) == 1.0
    with pytest.raises(ValueError, match="4 values in FP32 but 5"):
        output_cosine({"x": flat}, {"x": np.zeros(5, np.float32)})


def test_guard_parameters_are_validated() -> None:
    guard = AccuracyGuard.from_spec(
        AccuracyGuardSpec(
            min_agreement=0.9,
            iou_match=0.6,
            confident_margin=0.3,
            min_top5_overlap=0.7,
            min_logit_cosine=0.95,
        )
    )
    assert (guard.min_agreement, guard.iou_match, guard.confident_margin) == (0.9, 0.6, 0.3)
    assert (guard.min_top5_overlap, guard.min_logit_cosine) == (0.7, 0.95)
    with pytest.raises(ValueError, match="min_agreement"):
        AccuracyGuard(min_agreement=1.5)
    with pytest.raises(ValueError, match="iou_match"):
        AccuracyGuard(iou_match=0.0)
    with pytest.raises(ValueError, match="min_logit_cosine"):
        AccuracyGuard(min_logit_cosine=-0.1)
    with pytest.raises(ValueError, match="confident_margin"):
        AccuracyGuard(confident_margin=-1.0)


def test_the_default_guard_is_the_config_default_and_a_config_can_tighten_it() -> None:
    assert AccuracyGuard() == AccuracyGuard.from_spec(AccuracyGuardSpec())
    raw = {
        "task": "classification",
        "input": {"height": 8, "width": 8},
        "postprocess": {"kind": "classification"},
        "accuracy_guard": {"min_top5_overlap": 0.95, "confident_margin": 0.5},
    }
    spec = parse_model_config(raw, source="config.yaml").accuracy_guard
    guard = AccuracyGuard.from_spec(spec)
    assert (guard.min_top5_overlap, guard.confident_margin) == (0.95, 0.5)
    assert guard.min_agreement == AccuracyGuard().min_agreement


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
    assert verdict.passed and verdict.metric == "top1_confident" and verdict.images == 64
    assert verdict.agreement >= 0.98 and verdict.threshold == 0.98
    assert verdict.failed == () and verdict.reason == ""
    assert set(verdict.measures) == {"top1", "top1_confident", "top5_overlap", "logit_cosine"}
    assert verdict.measures["logit_cosine"] > 0.999
    candidate.close()


def test_badly_calibrated_int8_engine_is_refused_loudly(spec, fake_gpu, reference, caplog) -> None:
    tiny_range = [images(8, seed=7) * 0.001]  # calibration data unlike real inputs
    plan = build_serialized_engine(
        spec, classifier_onnx(), precision=Precision.INT8, calibration_batches=tiny_range
    )
    candidate = TensorRTEngine.from_serialized(spec, plan, precision=Precision.INT8)
    with caplog.at_level(logging.WARNING), pytest.raises(AccuracyGuardError) as err:
        AccuracyGuard(min_agreement=0.98).check(
            candidate, reference, VALIDATION, top5, model="tiny", version="1", precision="int8"
        )
    verdict = err.value.verdict
    assert verdict is not None and not verdict.passed and verdict.agreement < 0.5
    assert "top1_confident" in verdict.failed and verdict.reason in str(err.value)
    message = str(err.value)
    for part in ("tiny/1", "int8", f"{verdict.agreement:.4f}", "(below 0.9800)", "64 images"):
        assert part in message
    # The fallback is visible in the log: WARNING, with the measured values and thresholds.
    logged = [r for r in caplog.records if "refuses tiny/1" in r.getMessage()]
    assert [r.levelno for r in logged] == [logging.WARNING]
    assert f"top1_confident {verdict.agreement:.4f} (below 0.9800)" in logged[0].getMessage()
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
    same = guard.measure(reference, reference, VALIDATION, top5)
    assert (same.metric, same.images) == ("top1_confident", 64)
    assert all(value == pytest.approx(1.0) for value in same.measures.values())
    noisy = guard.measure(Perturbed(reference, 5.0), reference, VALIDATION, top5)
    assert noisy.measures["top1"] < 0.6 and noisy.measures["logit_cosine"] < 0.9
    with pytest.raises(AccuracyGuardError, match=r"top1_confident \S+ \(below 0.9800\)"):
        guard.check(
            Perturbed(reference, 5.0),
            reference,
            VALIDATION,
            top5,
            model="m",
            version="2",
            precision="fp16",
        )


def test_a_validation_set_brings_its_models_thresholds_unless_a_guard_is_given(
    spec, fake_gpu, tmp_path
) -> None:
    strict = ValidationSet(VALIDATION, top5, guard=AccuracyGuard(min_logit_cosine=1.0))
    cache = EngineCache(disk=DiskEngineStore(tmp_path / "engines"))
    with pytest.raises(AccuracyGuardError, match=r"logit_cosine \S+ \(below 1.0000\)"):
        build_engine(spec, Backend.TENSORRT, Precision.FP16, cache, validation=strict)
    report = build_engine(
        spec, Backend.TENSORRT, Precision.FP16, cache, validation=strict, guard=AccuracyGuard()
    )
    assert report.accuracy is not None and report.accuracy["passed"] is True
    assert report.accuracy["thresholds"]["logit_cosine"] == AccuracyGuard().min_logit_cosine


def test_empty_validation_set_is_refused(reference) -> None:
    with pytest.raises(AccuracyGuardError, match="validation set is empty"):
        AccuracyGuard().check(
            reference, reference, [], top5, model="m", version="1", precision="fp16"
        )


class Logits:
    """Returns fixed logits per image; image i of a batch is identified by ``batch[i, 0]``."""

    backend_name = "logits"

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        return {"logits": self.rows[batch[:, 0].astype(int)]}

    def close(self) -> None:
        pass


def _near_tie_reference(n: int = 100, ties: int = 30) -> np.ndarray:
    """``n`` images over 10 classes; the first ``ties`` have classes 0 and 1 nearly tied,
    the rest a clear winner (class 2)."""
    rows = np.tile(np.linspace(0.0, -2.0, 10, dtype=np.float32), (n, 1))
    rows[:ties, 0], rows[:ties, 1] = 4.0, 3.98
    rows[ties:, 2] = 6.0
    return rows


IDS = [np.arange(100, dtype=np.float32).reshape(100, 1)]


def test_swapped_near_ties_do_not_refuse_a_correct_engine() -> None:
    reference = _near_tie_reference()
    candidate = reference.copy()
    candidate[:30, [0, 1]] = candidate[:30, [1, 0]]  # every near-tie swapped: top-1 is 70 %
    guard = AccuracyGuard(min_agreement=0.98, confident_margin=0.1)
    verdict = guard.check(
        Logits(candidate), Logits(reference), IDS, top5, model="m", version="1", precision="fp16"
    )
    assert verdict.passed and verdict.confident_images == 70
    assert verdict.measures["top1"] == pytest.approx(0.7)
    assert verdict.measures["top1_confident"] == 1.0 and verdict.measures["top5_overlap"] == 1.0


def test_a_flip_of_a_confident_prediction_is_refused() -> None:
    reference = _near_tie_reference()
    candidate = reference.copy()
    candidate[30:35, 2] = -5.0  # 5 of 70 clear winners lost: 0.9286 < 0.98
    guard = AccuracyGuard(
        min_agreement=0.98, confident_margin=0.1, min_top5_overlap=0.5, min_logit_cosine=0.5
    )
    with pytest.raises(AccuracyGuardError, match="confident") as err:
        guard.check(
            Logits(candidate),
            Logits(reference),
            IDS,
            top5,
            model="m",
            version="1",
            precision="int8",
        )
    verdict = err.value.verdict
    assert verdict is not None and verdict.failed == ("top1_confident",)
    assert verdict.agreement == pytest.approx(65 / 70)
    assert verdict.to_dict()["thresholds"] == {
        "top1_confident": 0.98,
        "top5_overlap": 0.5,
        "logit_cosine": 0.5,
    }


def test_shuffled_labels_fail_every_measure() -> None:
    reference = np.random.default_rng(1).normal(0, 3, (100, 50)).astype(np.float32)
    shuffled = reference[:, np.random.default_rng(2).permutation(50)]
    with pytest.raises(AccuracyGuardError) as err:
        AccuracyGuard(confident_margin=0.5).check(
            Logits(shuffled), Logits(reference), IDS, top5, model="m", version="1", precision="fp16"
        )
    verdict = err.value.verdict
    assert verdict is not None
    assert set(verdict.failed) == {"top1_confident", "top5_overlap", "logit_cosine"}


def test_a_reference_never_confident_cannot_grade_and_refuses() -> None:
    rows = np.zeros((100, 10), np.float32)  # every image a perfect tie
    with pytest.raises(AccuracyGuardError, match="confident .* on none of the 100"):
        AccuracyGuard().check(
            Logits(rows), Logits(rows), IDS, top5, model="m", version="1", precision="fp16"
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
    assert verdict.measures == {"box_match": 1.0}


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
    assert "det/3 at int8" in str(err.value) and "box_match 0.3750 (below 0.9000)" in str(err.value)
    assert verdict.thresholds == {"box_match": 0.9} and verdict.failed == ("box_match",)
