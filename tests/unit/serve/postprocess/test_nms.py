"""Greedy NMS: edge cases, and agreement with the textbook loop on random boxes."""

from __future__ import annotations

import numpy as np
import pytest

from serve.postprocess import nms as nms_module
from serve.postprocess.nms import batched_nms, box_iou, nms


def loop_nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """The textbook greedy loop the vectorized version must reproduce."""
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    for i in order:
        if all(box_iou(boxes[i], boxes[k])[0, 0] <= threshold for k in kept):
            kept.append(int(i))
    return kept


def box(y: float, x: float, size: float = 10.0) -> list[float]:
    return [y, x, y + size, x + size]


def test_no_boxes_keeps_nothing() -> None:
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    assert batched_nms(np.zeros((0, 4)), np.zeros(0), np.zeros(0), 0.5).tolist() == []


def test_identical_boxes_are_all_suppressed_but_the_best() -> None:
    boxes = np.array([box(0, 0)] * 4)

    assert nms(boxes, np.array([0.2, 0.9, 0.5, 0.4]), 0.5).tolist() == [1]


def test_ties_keep_the_lower_index() -> None:
    boxes = np.array([box(0, 0), box(0, 1), box(50, 50)])

    assert nms(boxes, np.array([0.7, 0.7, 0.7]), 0.5).tolist() == [0, 2]


def test_a_suppressed_box_suppresses_nothing() -> None:
    # a overlaps b, b overlaps c, a does not overlap c: greedy keeps a and c.
    boxes = np.array([box(0, 0), box(0, 4), box(0, 8)])

    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.3).tolist() == [0, 2]


def test_iou_equal_to_the_threshold_is_not_suppressed() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5]], np.float32)  # IoU exactly 0.5

    assert nms(boxes, np.array([0.9, 0.8]), 0.5).tolist() == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), 0.49).tolist() == [0]


def test_max_output_caps_and_zero_keeps_nothing() -> None:
    boxes = np.array([box(0, 20 * i) for i in range(5)])
    scores = np.array([0.1, 0.5, 0.3, 0.9, 0.7])

    assert nms(boxes, scores, 0.5, max_output=2).tolist() == [3, 4]
    assert nms(boxes, scores, 0.5, max_output=0).tolist() == []


def test_empty_boxes_have_iou_zero_and_survive() -> None:
    boxes = np.array([[5, 5, 5, 5], [5, 5, 5, 5]], np.float32)

    assert box_iou(boxes, boxes).tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert nms(boxes, np.array([0.5, 0.4]), 0.5).tolist() == [0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_greedy_loop_on_random_clusters(seed: int) -> None:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 200, size=(6, 2)).repeat(20, axis=0) + rng.normal(0, 6, (120, 2))
    sizes = rng.uniform(10, 40, size=(120, 2))
    boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], axis=1)
    scores = rng.random(120).round(2)  # rounding creates ties

    assert nms(boxes, scores, 0.45).tolist() == loop_nms(boxes, scores, 0.45)


def test_batched_nms_never_suppresses_across_classes() -> None:
    boxes = np.array([box(0, 0), box(0, 1), box(0, 2), box(0, 0)])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    classes = np.array([3, 3, 17, 17])

    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 2]


def test_batched_nms_equals_nms_run_per_class() -> None:
    rng = np.random.default_rng(11)
    centres = rng.uniform(0, 100, (60, 2))
    boxes = np.concatenate([centres, centres + rng.uniform(5, 30, (60, 2))], axis=1)
    scores, classes = rng.random(60), rng.integers(0, 4, 60)

    kept = batched_nms(boxes, scores, classes, 0.4)

    per_class = []
    for c in range(4):
        members = np.flatnonzero(classes == c)
        per_class += members[nms(boxes[members], scores[members], 0.4)].tolist()
    assert sorted(kept.tolist()) == sorted(per_class)
    assert np.all(np.diff(scores[kept]) <= 0)


def test_only_the_best_candidates_enter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nms_module, "MAX_NMS_CANDIDATES", 3)
    boxes = np.array([box(0, 20 * i) for i in range(5)])

    assert nms(boxes, np.array([0.1, 0.5, 0.3, 0.9, 0.7]), 0.5).tolist() == [3, 4, 1]


def test_mismatched_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2,\)"):
        nms(np.zeros((3, 4)), np.zeros(2), 0.5)
