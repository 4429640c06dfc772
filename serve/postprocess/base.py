"""What every postprocessor receives: one image's outputs and its geometry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shared.results import Detection, Label


@dataclass(frozen=True, slots=True)
class ImageGeometry:
    """The affine map from original-image pixels to model-input pixels.

    ``input = original * scale + offset`` per axis. Center crops have negative
    offsets, letterboxes positive ones (the padding). Postprocessors use
    :meth:`to_relative` to report boxes relative to the *original* image.
    """

    original_height: int
    original_width: int
    input_height: int
    input_width: int
    scale_y: float
    scale_x: float
    offset_y: float = 0.0
    offset_x: float = 0.0

    def to_relative(
        self, ymin: np.ndarray, xmin: np.ndarray, ymax: np.ndarray, xmax: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Map boxes in model-input pixels to [0, 1] coordinates of the original image."""
        h, w = float(self.original_height), float(self.original_width)
        ry0 = np.clip((ymin - self.offset_y) / self.scale_y / h, 0.0, 1.0)
        rx0 = np.clip((xmin - self.offset_x) / self.scale_x / w, 0.0, 1.0)
        ry1 = np.clip((ymax - self.offset_y) / self.scale_y / h, 0.0, 1.0)
        rx1 = np.clip((xmax - self.offset_x) / self.scale_x / w, 0.0, 1.0)
        return ry0, rx0, ry1, rx1


class Postprocessor(Protocol):
    """Turns one image's raw outputs (batch dimension removed) into labels or detections."""

    @property
    def output_names(self) -> tuple[str, ...]:
        """Engine outputs this postprocessor reads."""
        ...

    def __call__(
        self, outputs: Mapping[str, np.ndarray], geometry: ImageGeometry, labels: Sequence[str]
    ) -> list[Label] | list[Detection]: ...


def label_for(class_id: int, labels: Sequence[str]) -> str:
    """The label of ``class_id``, or ``class_<id>`` when the labels file does not cover it."""
    return labels[class_id] if 0 <= class_id < len(labels) else f"class_{class_id}"
