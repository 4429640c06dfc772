"""The factory picks the postprocessor by the spec's kind."""

from __future__ import annotations

import pytest

from serve.model_config import ClassificationPost, MaskPost, SsdPost, YoloPost
from serve.postprocess.classification import TopKClassifier
from serve.postprocess.detection import MaskDetections, SsdDetections, YoloDetections
from serve.postprocess.factory import make_postprocessor


@pytest.mark.parametrize(
    ("spec", "kind", "outputs"),
    [
        (ClassificationPost(output="logits"), TopKClassifier, ("logits",)),
        (
            SsdPost(),
            SsdDetections,
            ("detection_boxes", "detection_scores", "detection_classes", "num_detections"),
        ),
        (
            SsdPost(count=None),
            SsdDetections,
            ("detection_boxes", "detection_scores", "detection_classes"),
        ),
        (YoloPost(output="output0"), YoloDetections, ("output0",)),
        (MaskPost(output="sigmoid_0.tmp_0"), MaskDetections, ("sigmoid_0.tmp_0",)),
        (MaskPost(), MaskDetections, ()),
    ],
)
def test_each_kind_gets_its_postprocessor_reading_the_configured_outputs(
    spec: object, kind: type, outputs: tuple[str, ...]
) -> None:
    postprocessor = make_postprocessor(spec)  # type: ignore[arg-type]

    assert isinstance(postprocessor, kind)
    assert postprocessor.output_names == outputs


def test_an_unknown_spec_is_rejected_by_name() -> None:
    with pytest.raises(ValueError, match="unknown postprocess kind 'segmentation'"):
        make_postprocessor(type("Spec", (), {"kind": "segmentation"})())  # type: ignore[arg-type]
