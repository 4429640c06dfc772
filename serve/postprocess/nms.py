"""Greedy non-maximum suppression in NumPy, without a Python loop over box pairs.

Boxes are ``[K, 4]`` arrays ``(min0, min1, max0, max1)``: ``(ymin, xmin, ymax,
xmax)`` and ``(xmin, ymin, xmax, ymax)`` give the same IoU, so callers need not
convert. The result is exactly that of the classic greedy loop (highest score
first, drop every later box overlapping a kept one by more than the threshold);
ties in score keep the lower index first.
"""

from __future__ import annotations

import numpy as np

# NMS builds a K x K overlap matrix; only the best-scoring candidates enter it so
# one noisy image cannot allocate gigabytes (2048^2 float32 is 16 MiB).
MAX_NMS_CANDIDATES = 2048


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union, ``[len(a), len(b)]``; empty boxes have IoU 0."""
    a = np.asarray(boxes_a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(boxes_b, dtype=np.float32).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0.0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0.0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0.0, None), axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    # Two empty boxes have union 0: define their IoU as 0 rather than NaN.
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    iou_threshold: float,
    max_output: int | None = None,
) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, best score first.

    A box is dropped when its IoU with a higher-ranked *kept* box exceeds
    ``iou_threshold``. Only the :data:`MAX_NMS_CANDIDATES` best boxes are
    considered.

    Raises:
        ValueError: when the shapes of ``boxes`` and ``scores`` do not match.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    scores = np.asarray(scores, dtype=np.float32)
    if boxes.ndim != 2 or boxes.shape[1] != 4 or scores.shape != (boxes.shape[0],):
        raise ValueError(
            f"nms needs boxes [K, 4] and scores [K], got {boxes.shape} and {scores.shape}"
        )
    limit = MAX_NMS_CANDIDATES if max_output is None else max_output
    if boxes.shape[0] == 0 or limit <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")[:MAX_NMS_CANDIDATES]
    iou = box_iou(boxes[order], boxes[order])
    # suppresses[i, j]: ranked box i would suppress ranked box j (only i before j).
    suppresses = np.triu(iou > iou_threshold, k=1)
    keep = _greedy_fixed_point(suppresses)
    return order[keep][:limit]


def _greedy_fixed_point(suppresses: np.ndarray) -> np.ndarray:
    """Solve ``keep[j] = not any(keep[i] and suppresses[i, j])`` for all j at once.

    ``suppresses`` is strictly upper triangular, so the equation has one
    solution, the greedy one. Iterating it from "keep everything" fixes box 0
    after one step, box 1 after two, ...; in practice it settles after as many
    steps as the longest chain of suppressions (a handful), each step one
    vectorized matrix-vector product. A suppressed box thus never suppresses
    others, unlike the one-step "Fast NMS" approximation.
    """
    count = suppresses.shape[0]
    keep = np.ones(count, dtype=bool)
    weights = suppresses.astype(np.float32)
    for _ in range(count):
        updated = (keep.astype(np.float32) @ weights) == 0
        if np.array_equal(updated, keep):
            break
        keep = updated
    return keep


def batched_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray,
    iou_threshold: float,
    max_output: int | None = None,
) -> np.ndarray:
    """Per-class NMS: boxes of different classes never suppress each other.

    Each class is shifted to its own region of the plane (offset larger than
    every box extent), so one :func:`nms` call does the work of one per class.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    classes = np.asarray(classes)
    if boxes.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    if classes.shape != (boxes.shape[0],):
        raise ValueError(f"batched_nms needs classes [K], got {classes.shape} for {boxes.shape}")
    span = float(boxes.max() - boxes.min()) + 1.0
    # Rank classes by dense index so offsets stay small even for sparse class ids.
    _, dense = np.unique(classes, return_inverse=True)
    shifted = boxes + (dense.astype(np.float32) * span)[:, None]
    return nms(shifted, scores, iou_threshold, max_output)
