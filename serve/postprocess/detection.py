"""Detections from the three common ONNX detector conventions.

* :class:`SsdDetections`: boxes already decoded by the model (TF Object Detection API style).
* :class:`YoloDetections`: raw YOLO head output, decoded here and reduced with NMS.
* :class:`MaskDetections`: a probability map (DBNet-style text detectors) turned into boxes.

Every postprocessor receives ONE image's outputs (batch dimension removed), reads
them by the names in its spec and reports boxes relative to the original image
via :meth:`ImageGeometry.to_relative`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from serve.model_config import MaskPost, SsdPost, YoloPost
from serve.postprocess.base import ImageGeometry, label_for
from serve.postprocess.nms import batched_nms, nms
from shared.errors import ConfigError
from shared.results import Detection

__all__ = [
    "ComponentStats",
    "MaskDetections",
    "SsdDetections",
    "YoloDetections",
    "component_stats",
    "label_components",
    "output_by_name",
]


def output_by_name(outputs: Mapping[str, np.ndarray], name: str, model_kind: str) -> np.ndarray:
    """The output called ``name``.

    Raises:
        ConfigError: naming the missing output and the outputs that exist.
    """
    try:
        return np.asarray(outputs[name])
    except KeyError:
        raise ConfigError(
            f"{model_kind} postprocess needs output {name!r}, model outputs are {sorted(outputs)}"
        ) from None


def _detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    class_ids: np.ndarray,
    names: Sequence[str],
    geometry: ImageGeometry,
    limit: int | None = None,
) -> list[Detection]:
    """Map ``[K, 4]`` model-input boxes ``(ymin, xmin, ymax, xmax)`` to relative Detections.

    Boxes that are empty once clipped to the original image (e.g. entirely in
    letterbox padding) are dropped before the first ``limit`` are kept, so
    padding cannot use up the cap; order is preserved.
    """
    y0, x0, y1, x1 = geometry.to_relative(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    visible = np.flatnonzero((y1 > y0) & (x1 > x0))[:limit]
    return [
        Detection(
            ymin=round(float(y0[i]), 6),
            xmin=round(float(x0[i]), 6),
            ymax=round(float(y1[i]), 6),
            xmax=round(float(x1[i]), 6),
            score=round(float(scores[i]), 6),
            class_id=int(class_ids[i]),
            label=names[i],
        )
        for i in visible
    ]


class SsdDetections:
    """Boxes the model already decoded: keep scores >= threshold among the first ``count``,
    best first, map back, cap at ``max_detections``."""

    def __init__(self, spec: SsdPost) -> None:
        self._spec = spec

    @property
    def output_names(self) -> tuple[str, ...]:
        spec = self._spec
        names = (spec.boxes, spec.scores, spec.classes)
        return names if spec.count is None else (*names, spec.count)

    def __call__(
        self, outputs: Mapping[str, np.ndarray], geometry: ImageGeometry, labels: Sequence[str]
    ) -> list[Detection]:
        spec = self._spec
        boxes = output_by_name(outputs, spec.boxes, "ssd").astype(np.float64)
        scores = output_by_name(outputs, spec.scores, "ssd").astype(np.float64).reshape(-1)
        classes = output_by_name(outputs, spec.classes, "ssd").reshape(-1)
        shape_ok = boxes.ndim == 2 and boxes.shape[1] == 4
        if not shape_ok or not boxes.shape[0] == scores.size == classes.size:
            raise ConfigError(
                f"ssd outputs must be boxes [K, 4], scores [K], classes [K] per image, got "
                f"{spec.boxes} {boxes.shape}, {spec.scores} {scores.shape}, {spec.classes} {classes.shape}"
            )
        valid = np.arange(scores.size) < self._valid_count(outputs, scores.size)
        candidates = np.flatnonzero(valid & (scores >= spec.score_threshold))
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        boxes = boxes[order]
        if spec.box_format == "xyxy":
            boxes = boxes[:, [1, 0, 3, 2]]
        if spec.boxes_normalized:
            boxes = boxes * np.array([geometry.input_height, geometry.input_width] * 2)
        # TF OD API class ids are 1-based against a 0-based labels list: the offset
        # makes class_id and label agree with the labels file.
        class_ids = np.rint(classes[order].astype(np.float64)).astype(np.int64) + spec.class_offset
        names = [label_for(int(c), labels) for c in class_ids]
        return _detections(boxes, scores[order], class_ids, names, geometry, spec.max_detections)

    def _valid_count(self, outputs: Mapping[str, np.ndarray], capacity: int) -> int:
        if self._spec.count is None:
            return capacity
        count = output_by_name(outputs, self._spec.count, "ssd").reshape(-1)
        if count.size != 1:
            raise ConfigError(
                f"ssd output {self._spec.count!r} must hold one count per image, got shape {count.shape}"
            )
        return min(int(count[0]), capacity)


class YoloDetections:
    """Raw YOLO output: decode ``cx, cy, w, h`` + class scores, threshold, NMS, cap, map back.

    ``channels_first`` is ``[4 + C, A]`` per image (YOLOv8 exports),
    ``anchors_first`` is ``[A, 4 (+1 objectness) + C]`` (YOLOv5 exports).
    """

    def __init__(self, spec: YoloPost) -> None:
        self._spec = spec

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self._spec.output,)

    def __call__(
        self, outputs: Mapping[str, np.ndarray], geometry: ImageGeometry, labels: Sequence[str]
    ) -> list[Detection]:
        spec = self._spec
        rows = self._rows(output_by_name(outputs, spec.output, "yolo"))
        first_class = 5 if spec.has_objectness else 4
        class_scores = rows[:, first_class:]
        class_ids = np.argmax(class_scores, axis=1)
        scores = class_scores[np.arange(rows.shape[0]), class_ids]
        if spec.has_objectness:
            scores = scores * rows[:, 4]
        candidates = np.flatnonzero(scores >= spec.score_threshold)
        cx, cy, w, h = (rows[candidates, i] for i in range(4))
        boxes = np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)
        scores, class_ids = scores[candidates], class_ids[candidates]
        if spec.class_agnostic_nms:
            keep = nms(boxes, scores, spec.iou_threshold)
        else:
            keep = batched_nms(boxes, scores, class_ids, spec.iou_threshold)
        names = [label_for(int(c), labels) for c in class_ids[keep]]
        boxes, scores, class_ids = boxes[keep], scores[keep], class_ids[keep]
        return _detections(boxes, scores, class_ids, names, geometry, spec.max_detections)

    def _rows(self, raw: np.ndarray) -> np.ndarray:
        """One row per anchor: ``[A, 4 (+1) + C]``."""
        spec = self._spec
        first_class = 5 if spec.has_objectness else 4
        if raw.ndim != 2:
            raise ConfigError(
                f"yolo output {spec.output!r} must be 2-D per image ({spec.layout}), got shape {raw.shape}"
            )
        rows = raw.T if spec.layout == "channels_first" else raw
        if rows.shape[1] <= first_class:
            raise ConfigError(
                f"yolo output {spec.output!r} of shape {raw.shape} ({spec.layout}) has no class "
                f"scores: need more than {first_class} values per anchor"
            )
        return rows.astype(np.float32, copy=False)


class MaskDetections:
    """A probability map to one box per connected region (DBNet-style text detection).

    Pixels above ``threshold`` are grouped into 8-connected components; each
    component of at least ``min_area`` map pixels becomes a box scored by its
    mean probability. DBNet predicts text regions *shrunk* by a fixed ratio, so
    ``unclip_ratio`` > 0 grows each box by ``area * unclip_ratio / perimeter``
    map pixels (DBNet's own expansion distance; 1.5-2.0 for PP-OCR models).
    """

    def __init__(self, spec: MaskPost, unclip_ratio: float | None = None) -> None:
        self._spec = spec
        # An explicit argument overrides the config (tests use it to switch unclip off).
        ratio = spec.unclip_ratio if unclip_ratio is None else unclip_ratio
        if ratio < 0:
            raise ValueError(f"unclip_ratio must be >= 0, got {ratio}")
        self._unclip_ratio = float(ratio)

    @property
    def output_names(self) -> tuple[str, ...]:
        # No name configured: the engine returns every output and the map must be the only one.
        return () if self._spec.output is None else (self._spec.output,)

    def __call__(
        self, outputs: Mapping[str, np.ndarray], geometry: ImageGeometry, labels: Sequence[str]
    ) -> list[Detection]:
        spec = self._spec
        prob = self._probability_map(outputs)
        components, count = label_components(prob > spec.threshold)
        if count == 0:
            return []
        stats = component_stats(components, count, prob)
        keep = np.flatnonzero(stats.area >= spec.min_area)
        keep = keep[np.argsort(-stats.mean_probability[keep], kind="stable")]
        scores = stats.mean_probability[keep]
        grow = self._unclip_ratio * stats.area[keep] / stats.perimeter[keep]
        boxes = stats.boxes[keep] + grow[:, None] * np.array([-1.0, -1.0, 1.0, 1.0])
        map_h, map_w = prob.shape
        # The map may be smaller than the input (stride > 1): scale to input pixels.
        boxes = boxes * np.array([geometry.input_height / map_h, geometry.input_width / map_w] * 2)
        class_ids = np.zeros(keep.size, dtype=np.int64)
        return _detections(boxes, scores, class_ids, [spec.label] * keep.size, geometry)

    def _probability_map(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        name = self._spec.output
        if name is None:
            if len(outputs) != 1:
                raise ConfigError(
                    "mask postprocess has no output name configured and the model has "
                    f"{len(outputs)} outputs {sorted(outputs)}: set postprocess.output"
                )
            name = next(iter(outputs))
        prob = output_by_name(outputs, name, "mask")
        if prob.ndim == 3 and prob.shape[0] == 1:
            prob = prob[0]
        if prob.ndim != 2:
            raise ConfigError(
                f"mask output {name!r} must be [1, H, W] or [H, W] per image, got shape {prob.shape}"
            )
        return prob.astype(np.float32, copy=False)


@dataclass(frozen=True, slots=True)
class ComponentStats:
    """Per-component measurements, index ``i`` for component label ``i + 1``.

    ``boxes`` are ``[n, 4]`` ``(ymin, xmin, ymax, xmax)`` pixel *edges* (a single
    pixel at row r, column c spans ``(r, c, r + 1, c + 1)``); ``perimeter``
    counts pixel edges between the component and anything else.
    """

    area: np.ndarray
    boxes: np.ndarray
    perimeter: np.ndarray
    mean_probability: np.ndarray


# Neighbour offsets (dy, dx) that make 8-connectivity; each pair is listed once.
_NEIGHBOURS_8 = ((0, 1), (1, 0), (1, 1), (1, -1))


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask, like ``scipy.ndimage.label``.

    Returns ``(labels, count)``: ``labels`` is an int32 array shaped like
    ``mask``, 0 for background and 1..count for components numbered in raster
    order of their first pixel.

    Union-find in vectorized rounds: every round hooks, for all neighbour pairs
    in different trees at once, the larger root under the smaller one, then
    flattens the trees by pointer jumping. Each round merges at least one pair
    of trees and in practice a handful of rounds suffice, whatever the shapes.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"label_components needs a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    pixels = np.flatnonzero(mask)
    labels = np.zeros(height * width, dtype=np.int32)
    if pixels.size == 0:
        return labels.reshape(height, width), 0
    index = np.full((height, width), -1, dtype=np.int64)
    index.flat[pixels] = np.arange(pixels.size)
    first, second = _neighbour_pairs(index)
    parent = np.arange(pixels.size)
    while True:
        root_a, root_b = parent[first], parent[second]
        differ = root_a != root_b
        if not differ.any():
            break
        root_a, root_b = root_a[differ], root_b[differ]
        np.minimum.at(parent, np.maximum(root_a, root_b), np.minimum(root_a, root_b))
        while True:  # pointer jumping until every pixel points at its root
            jumped = parent[parent]
            if np.array_equal(jumped, parent):
                break
            parent = jumped
    # Roots are the smallest pixel index of their tree: raster order of first pixel.
    _, dense = np.unique(parent, return_inverse=True)
    labels[pixels] = dense.astype(np.int32) + 1
    return labels.reshape(height, width), int(dense.max()) + 1


def _neighbour_pairs(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compressed indices of every pair of 8-adjacent foreground pixels."""
    height, width = index.shape
    firsts, seconds = [], []
    for dy, dx in _NEIGHBOURS_8:
        a = index[: height - dy, max(0, -dx) : width - max(0, dx)]
        b = index[dy:, max(0, dx) : width - max(0, -dx)]
        both = (a >= 0) & (b >= 0)
        firsts.append(a[both])
        seconds.append(b[both])
    return np.concatenate(firsts), np.concatenate(seconds)


def component_stats(labels: np.ndarray, count: int, prob: np.ndarray) -> ComponentStats:
    """Area, bounding box, perimeter and mean of ``prob`` for components ``1..count``."""
    rows, cols = np.nonzero(labels)
    ids = labels[rows, cols].astype(np.int64) - 1
    area = np.bincount(ids, minlength=count).astype(np.float64)
    # Group pixels by component (labels are 1..count, none empty) and reduce each run.
    order = np.argsort(ids, kind="stable")
    starts = np.concatenate([[0], np.cumsum(area[:-1], dtype=np.int64)])
    rows_by, cols_by = rows[order], cols[order]
    boxes = np.stack(
        [
            np.minimum.reduceat(rows_by, starts),
            np.minimum.reduceat(cols_by, starts),
            np.maximum.reduceat(rows_by, starts) + 1,
            np.maximum.reduceat(cols_by, starts) + 1,
        ],
        axis=1,
    ).astype(np.float64)
    # Boundary edges: the 4 sides of each pixel whose neighbour is another label.
    padded = np.pad(labels, 1)
    own = padded[rows + 1, cols + 1]
    sides = sum(
        (padded[rows + 1 + dy, cols + 1 + dx] != own).astype(np.int64)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))
    )
    perimeter = np.bincount(ids, weights=sides, minlength=count)
    total = np.bincount(ids, weights=prob[rows, cols].astype(np.float64), minlength=count)
    return ComponentStats(area, boxes, perimeter, total / area)
