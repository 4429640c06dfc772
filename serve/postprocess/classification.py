"""Top-k labels from classifier logits or probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from serve.model_config import ClassificationPost
from serve.postprocess.base import ImageGeometry, label_for
from shared.results import Label


class TopKClassifier:
    """Softmax (optional) then the ``top_k`` highest-scoring classes, best first."""

    def __init__(self, spec: ClassificationPost) -> None:
        self._spec = spec

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self._spec.output,)

    def __call__(
        self, outputs: Mapping[str, np.ndarray], geometry: ImageGeometry, labels: Sequence[str]
    ) -> list[Label]:
        scores = np.asarray(outputs[self._spec.output], dtype=np.float64).reshape(-1)
        if self._spec.apply_softmax:
            shifted = np.exp(scores - scores.max())
            scores = shifted / shifted.sum()
        k = min(self._spec.top_k, scores.size)
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [
            Label(class_id=int(i), label=label_for(int(i), labels), score=round(float(scores[i]), 6))
            for i in top
        ]
