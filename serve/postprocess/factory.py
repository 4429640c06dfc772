"""Build the postprocessor a model config asks for."""

from __future__ import annotations

from serve.model_config import ClassificationPost, MaskPost, PostprocessSpec, SsdPost, YoloPost
from serve.postprocess.base import Postprocessor
from serve.postprocess.classification import TopKClassifier
from serve.postprocess.detection import MaskDetections, SsdDetections, YoloDetections


def make_postprocessor(spec: PostprocessSpec) -> Postprocessor:
    """The postprocessor for ``spec``, chosen by its ``kind``.

    Raises:
        ValueError: for a spec of no known kind.
    """
    match spec:
        case ClassificationPost():
            return TopKClassifier(spec)
        case SsdPost():
            return SsdDetections(spec)
        case YoloPost():
            return YoloDetections(spec)
        case MaskPost():
            return MaskDetections(spec)
    raise ValueError(f"unknown postprocess kind {getattr(spec, 'kind', spec)!r}")
