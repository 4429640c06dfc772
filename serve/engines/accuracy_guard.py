"""The accuracy guard: a reduced-precision engine must agree with FP32 before it serves.

FP16 and INT8 engines are faster, and usually equivalent; "usually" is not good
enough for results people rely on (bad INT8 calibration data, an FP16 overflow in
one layer). Before such an engine is activated (and before it is published to the
engine cache) its postprocessed outputs on a validation set are compared with FP32
ONNX Runtime's:

* classification: the fraction of images whose top-1 class matches;
* detection: per image, the fraction of reference boxes matched by a candidate box
  of the same class with IoU >= ``iou_match`` (an image where neither side finds
  anything agrees; candidate-only boxes on an empty reference disagree), averaged.

Below ``min_agreement`` the engine is refused with :class:`AccuracyGuardError`,
logged at ERROR.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from serve.engines.base import Engine
from serve.model_config import AccuracyGuardSpec
from shared.errors import TriggerfishError
from shared.results import Detection, Label

logger = logging.getLogger(__name__)

#: Turns one image's outputs (batch dimension removed) into its labels or detections.
ImagePostprocess = Callable[[Mapping[str, np.ndarray]], Sequence[Label] | Sequence[Detection]]

__all__ = [
    "AccuracyGuard",
    "AccuracyGuardError",
    "AccuracyVerdict",
    "ImagePostprocess",
    "box_agreement",
    "iou",
    "top1_agrees",
]


class AccuracyGuardError(TriggerfishError):
    """A reduced-precision engine disagrees with FP32 too often to be activated."""

    def __init__(self, message: str, verdict: AccuracyVerdict | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class AccuracyVerdict:
    """The measured agreement of one engine with FP32 ONNX Runtime.

    Attributes:
        metric: ``top1`` (classification) or ``box_match`` (detection).
        agreement: In [0, 1].
        threshold: ``min_agreement`` it was held to.
        images: Validation images compared.
        passed: ``agreement >= threshold``.
    """

    model: str
    version: str
    precision: str
    metric: str
    agreement: float
    threshold: float
    images: int
    passed: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def iou(a: Detection, b: Detection) -> float:
    """Intersection over union of two boxes (relative ``ymin, xmin, ymax, xmax``)."""
    h = min(a.ymax, b.ymax) - max(a.ymin, b.ymin)
    w = min(a.xmax, b.xmax) - max(a.xmin, b.xmin)
    inter = max(h, 0.0) * max(w, 0.0)
    area_a = max(a.ymax - a.ymin, 0.0) * max(a.xmax - a.xmin, 0.0)
    area_b = max(b.ymax - b.ymin, 0.0) * max(b.xmax - b.xmin, 0.0)
    union = area_a + area_b - inter
    return inter / union if union > 0 else 0.0


def top1_agrees(reference: Sequence[Label], candidate: Sequence[Label]) -> bool:
    """Same highest-scoring class (both empty also agrees)."""
    if not reference or not candidate:
        return not reference and not candidate
    best_ref = max(reference, key=lambda label: label.score)
    best_cand = max(candidate, key=lambda label: label.score)
    return best_ref.class_id == best_cand.class_id


def box_agreement(
    reference: Sequence[Detection], candidate: Sequence[Detection], iou_match: float
) -> float:
    """Fraction of reference boxes matched one-to-one by same-class candidate boxes."""
    if not reference:
        return 1.0 if not candidate else 0.0
    unmatched = list(candidate)
    matched = 0
    for ref in sorted(reference, key=lambda d: d.score, reverse=True):
        scored = [(iou(ref, c), i) for i, c in enumerate(unmatched) if c.class_id == ref.class_id]
        if scored:
            best, index = max(scored)
            if best >= iou_match:
                matched += 1
                unmatched.pop(index)
    return matched / len(reference)


def _per_image(outputs: Mapping[str, np.ndarray], n: int) -> list[dict[str, np.ndarray]]:
    for name, value in outputs.items():
        if len(value) != n:
            raise ValueError(f"output {name} has {len(value)} rows for a batch of {n}")
    return [{name: value[i] for name, value in outputs.items()} for i in range(n)]


def _is_detections(items: Sequence[object]) -> bool:
    return bool(items) and isinstance(items[0], Detection)


@dataclass(frozen=True, slots=True)
class AccuracyGuard:
    """Agreement threshold and box-matching IoU (see the module docstring)."""

    min_agreement: float = 0.98
    iou_match: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement must be in [0, 1], got {self.min_agreement}")
        if not 0.0 < self.iou_match <= 1.0:
            raise ValueError(f"iou_match must be in (0, 1], got {self.iou_match}")

    @classmethod
    def from_spec(cls, spec: AccuracyGuardSpec) -> AccuracyGuard:
        """From the model config's ``accuracy_guard`` section."""
        return cls(min_agreement=spec.min_agreement, iou_match=spec.iou_match)

    def measure(
        self,
        candidate: Engine,
        reference: Engine,
        batches: Iterable[np.ndarray],
        postprocess: ImagePostprocess,
    ) -> tuple[float, int, str]:
        """``(agreement, images, metric)`` of ``candidate`` against ``reference``."""
        scores: list[float] = []
        detection = False
        for batch in batches:
            n = len(batch)
            ref_images = _per_image(reference.infer(batch), n)
            cand_images = _per_image(candidate.infer(batch), n)
            for ref_out, cand_out in zip(ref_images, cand_images, strict=True):
                ref, cand = list(postprocess(ref_out)), list(postprocess(cand_out))
                if _is_detections(ref) or _is_detections(cand):
                    detection = True
                    scores.append(box_agreement(ref, cand, self.iou_match))  # type: ignore[arg-type]
                else:
                    scores.append(1.0 if top1_agrees(ref, cand) else 0.0)  # type: ignore[arg-type]
        agreement = float(np.mean(scores)) if scores else 0.0
        return agreement, len(scores), "box_match" if detection else "top1"

    def check(
        self,
        candidate: Engine,
        reference: Engine,
        batches: Iterable[np.ndarray],
        postprocess: ImagePostprocess,
        *,
        model: str,
        version: str,
        precision: str,
    ) -> AccuracyVerdict:
        """Measure and decide; returns the verdict when it passes.

        Raises:
            AccuracyGuardError: agreement below ``min_agreement``, or an empty validation
                set (an unchecked reduced-precision engine is refused, not waved through).
        """
        agreement, images, metric = self.measure(candidate, reference, batches, postprocess)
        verdict = AccuracyVerdict(
            model=model,
            version=version,
            precision=precision,
            metric=metric,
            agreement=agreement,
            threshold=self.min_agreement,
            images=images,
            passed=images > 0 and agreement >= self.min_agreement,
        )
        if images == 0:
            message = (
                f"accuracy guard refuses {model}/{version} at {precision}: the validation set is "
                "empty, so agreement with FP32 cannot be measured"
            )
        elif not verdict.passed:
            message = (
                f"accuracy guard refuses {model}/{version} at {precision}: {metric} agreement with "
                f"FP32 ONNX Runtime is {agreement:.4f} on {images} images, below the threshold "
                f"{self.min_agreement:.4f}"
            )
        else:
            logger.info(
                "accuracy guard: %s/%s at %s agrees %.4f (threshold %.4f, %d images)",
                model,
                version,
                precision,
                agreement,
                self.min_agreement,
                images,
            )
            return verdict
        logger.error(message)
        raise AccuracyGuardError(message, verdict)
