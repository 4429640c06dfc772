"""The accuracy guard: a reduced-precision engine must agree with FP32 before it serves.

FP16 and INT8 engines are faster, and usually equivalent; "usually" is not good
enough for results people rely on (bad INT8 calibration data, an FP16 overflow in
one layer). Before such an engine is activated (and before it is published to the
engine cache) its outputs on a validation set are compared with FP32 ONNX Runtime's.

Plain top-1 agreement is a poor yardstick: on an image where the reference's two
best classes are nearly tied, any correct engine (even FP32 on another thread
count) may swap them, so a threshold near 100 % refuses correct engines and one far
below it lets real damage through. The guard therefore grades classifiers on three
measures that a correct engine keeps close to 1 and a damaged one does not:

* ``top1_confident``: top-1 agreement on the images where the reference is
  confident, i.e. its best score beats its runner-up by ``confident_margin``
  (postprocessed score units: softmax probabilities for the shipped classifier);
* ``top5_overlap``: mean fraction of the reference's top-k classes that the
  candidate also returns;
* ``logit_cosine``: mean per-image cosine similarity of the raw float outputs after
  centring each (softmax ignores a constant shift, so the shift is no signal).

Detectors are graded by ``box_match``: per image, the fraction of reference boxes
matched by a candidate box of the same class with IoU >= ``iou_match`` (an image where
neither side finds anything agrees; candidate-only boxes on an empty reference
disagree), averaged.

The default thresholds come from measured noise (``infra/modelprep/guard_noise.py``):
see :class:`serve.model_config.AccuracyGuardSpec`. A refused engine raises
:class:`AccuracyGuardError` (the replica then falls back to its next backend) and is
logged at WARNING with every measure and its threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

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
    "Agreement",
    "ImagePostprocess",
    "box_agreement",
    "iou",
    "output_cosine",
    "top1_agrees",
    "topk_overlap",
]

_DEFAULTS = AccuracyGuardSpec()


class AccuracyGuardError(TriggerfishError):
    """A reduced-precision engine disagrees with FP32 too often to be activated."""

    def __init__(self, message: str, verdict: AccuracyVerdict | None = None) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclass(frozen=True, slots=True)
class Agreement:
    """What :meth:`AccuracyGuard.measure` found.

    Attributes:
        metric: ``top1_confident`` (classification) or ``box_match`` (detection): the
            measure held to ``min_agreement``.
        measures: Every measure by name, each in [0, 1] (classification: ``top1``,
            ``top1_confident``, ``top5_overlap``, ``logit_cosine``; detection: ``box_match``).
        images: Validation images compared.
        confident_images: Images the reference was confident on (classification).
    """

    metric: str
    measures: Mapping[str, float]
    images: int
    confident_images: int = 0


@dataclass(frozen=True, slots=True)
class AccuracyVerdict:
    """The measured agreement of one engine with FP32 ONNX Runtime.

    Attributes:
        metric: The measure ``agreement`` reports (``top1_confident`` or ``box_match``).
        agreement: That measure, in [0, 1].
        threshold: ``min_agreement`` it was held to.
        images: Validation images compared.
        passed: Every measure is at or above its threshold.
        measures: Every measure by name.
        thresholds: The threshold of every graded measure.
        failed: The measures below their threshold (empty when it passed).
        reason: One line saying why it was refused ("" when it passed).
    """

    model: str
    version: str
    precision: str
    metric: str
    agreement: float
    threshold: float
    images: int
    passed: bool
    measures: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    confident_images: int = 0
    failed: tuple[str, ...] = ()
    reason: str = ""

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


def _ranked(labels: Sequence[Label]) -> list[Label]:
    return sorted(labels, key=lambda label: label.score, reverse=True)


def top1_agrees(reference: Sequence[Label], candidate: Sequence[Label]) -> bool:
    """Same highest-scoring class (both empty also agrees)."""
    if not reference or not candidate:
        return not reference and not candidate
    return _ranked(reference)[0].class_id == _ranked(candidate)[0].class_id


def top1_margin(labels: Sequence[Label]) -> float:
    """How far the best score is ahead of the runner-up (infinite with a single label)."""
    ranked = _ranked(labels)
    if len(ranked) < 2:
        return float("inf") if ranked else 0.0
    return ranked[0].score - ranked[1].score


def topk_overlap(reference: Sequence[Label], candidate: Sequence[Label]) -> float:
    """Fraction of the reference's classes that the candidate also returns (order ignored)."""
    ref = {label.class_id for label in reference}
    if not ref:
        return 1.0 if not candidate else 0.0
    return len(ref & {label.class_id for label in candidate}) / len(ref)


def output_cosine(
    reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]
) -> float:
    """Cosine similarity of one image's centred float outputs (1.0 when both are constant
    and equal); integer outputs (class ids, counts) are left out."""
    names = [
        n for n in sorted(reference) if np.issubdtype(np.asarray(reference[n]).dtype, np.floating)
    ]
    if not names:
        return 1.0
    ref = np.concatenate([np.asarray(reference[n], np.float64).ravel() for n in names])
    cand = np.concatenate([np.asarray(candidate[n], np.float64).ravel() for n in names])
    if ref.shape != cand.shape:
        raise ValueError(f"outputs {names} have {ref.size} values in FP32 but {cand.size} here")
    ref, cand = ref - ref.mean(), cand - cand.mean()
    norms = float(np.linalg.norm(ref) * np.linalg.norm(cand))
    if norms == 0.0 or not np.isfinite(norms):
        return 1.0 if np.array_equal(ref, cand) else 0.0
    return float(np.dot(ref, cand) / norms)


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


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else 0.0


@dataclass(frozen=True, slots=True)
class AccuracyGuard:
    """Thresholds of the measures in the module docstring; defaults are the config's."""

    min_agreement: float = _DEFAULTS.min_agreement
    iou_match: float = _DEFAULTS.iou_match
    confident_margin: float = _DEFAULTS.confident_margin
    min_top5_overlap: float = _DEFAULTS.min_top5_overlap
    min_logit_cosine: float = _DEFAULTS.min_logit_cosine

    def __post_init__(self) -> None:
        for name in ("min_agreement", "min_top5_overlap", "min_logit_cosine"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if not 0.0 < self.iou_match <= 1.0:
            raise ValueError(f"iou_match must be in (0, 1], got {self.iou_match}")
        if self.confident_margin < 0.0:
            raise ValueError(f"confident_margin must be >= 0, got {self.confident_margin}")

    @classmethod
    def from_spec(cls, spec: AccuracyGuardSpec) -> AccuracyGuard:
        """From the model config's ``accuracy_guard`` section."""
        return cls(
            min_agreement=spec.min_agreement,
            iou_match=spec.iou_match,
            confident_margin=spec.confident_margin,
            min_top5_overlap=spec.min_top5_overlap,
            min_logit_cosine=spec.min_logit_cosine,
        )

    def thresholds(self, metric: str) -> dict[str, float]:
        """The threshold of every measure graded for ``metric``."""
        if metric == "box_match":
            return {"box_match": self.min_agreement}
        return {
            "top1_confident": self.min_agreement,
            "top5_overlap": self.min_top5_overlap,
            "logit_cosine": self.min_logit_cosine,
        }

    def measure(
        self,
        candidate: Engine,
        reference: Engine,
        batches: Iterable[np.ndarray],
        postprocess: ImagePostprocess,
    ) -> Agreement:
        """Every measure of ``candidate`` against ``reference`` on ``batches``."""
        top1: list[float] = []
        confident: list[float] = []
        overlap: list[float] = []
        cosine: list[float] = []
        boxes: list[float] = []
        empty = 0  # neither side found anything: agrees, whichever task it is
        for batch in batches:
            n = len(batch)
            ref_images = _per_image(reference.infer(batch), n)
            cand_images = _per_image(candidate.infer(batch), n)
            for ref_out, cand_out in zip(ref_images, cand_images, strict=True):
                ref, cand = list(postprocess(ref_out)), list(postprocess(cand_out))
                if not ref and not cand:
                    empty += 1
                elif _is_detections(ref) or _is_detections(cand):
                    boxes.append(box_agreement(ref, cand, self.iou_match))  # type: ignore[arg-type]
                else:
                    agrees = 1.0 if top1_agrees(ref, cand) else 0.0  # type: ignore[arg-type]
                    top1.append(agrees)
                    if top1_margin(ref) >= self.confident_margin:  # type: ignore[arg-type]
                        confident.append(agrees)
                    overlap.append(topk_overlap(ref, cand))  # type: ignore[arg-type]
                    cosine.append(output_cosine(ref_out, cand_out))
        if boxes and top1:
            raise ValueError("the postprocess returned labels for some images, boxes for others")
        if boxes:
            scores = boxes + [1.0] * empty
            return Agreement("box_match", {"box_match": _mean(scores)}, len(scores))
        top1 += [1.0] * empty
        overlap += [1.0] * empty
        measures = {
            "top1": _mean(top1),
            "top1_confident": _mean(confident),
            "top5_overlap": _mean(overlap),
            "logit_cosine": _mean(cosine) if cosine else 1.0,
        }
        return Agreement("top1_confident", measures, len(top1), len(confident))

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
            AccuracyGuardError: a measure below its threshold, an empty validation set, or
                no image the reference is confident on (an engine that cannot be checked is
                refused, not waved through).
        """
        found = self.measure(candidate, reference, batches, postprocess)
        thresholds = self.thresholds(found.metric)
        failed = tuple(n for n, t in thresholds.items() if not found.measures[n] >= t)
        what = f"{model}/{version} at {precision}"
        if found.images == 0:
            reason = "the validation set is empty, so agreement with FP32 cannot be measured"
        elif found.metric == "top1_confident" and found.confident_images == 0:
            reason = (
                f"FP32 is confident (top-1 margin >= {self.confident_margin}) on none of the "
                f"{found.images} validation images, so agreement cannot be measured"
            )
        elif failed:
            reason = f"agreement with FP32 ONNX Runtime: {_describe(found, thresholds, failed)}"
        else:
            reason = ""
        verdict = AccuracyVerdict(
            model=model,
            version=version,
            precision=precision,
            metric=found.metric,
            agreement=found.measures[found.metric],
            threshold=self.min_agreement,
            images=found.images,
            passed=not reason,
            measures=dict(found.measures),
            thresholds=thresholds,
            confident_images=found.confident_images,
            failed=failed if reason else (),
            reason=reason,
        )
        if verdict.passed:
            logger.info("accuracy guard passes %s: %s", what, _describe(found, thresholds, ()))
            return verdict
        message = f"accuracy guard refuses {what}: {reason}"
        # A refusal is handled (the next backend serves), so WARNING, not ERROR; the line
        # carries every measure and threshold so the fallback is visible in the logs too.
        logger.warning(message)
        raise AccuracyGuardError(message, verdict)


def _describe(found: Agreement, thresholds: Mapping[str, float], failed: Sequence[str]) -> str:
    parts = []
    for name, threshold in thresholds.items():
        mark = "below" if name in failed else "threshold"
        parts.append(f"{name} {found.measures[name]:.4f} ({mark} {threshold:.4f})")
    counted = f"on {found.images} images"
    if found.metric == "top1_confident":
        counted += f", {found.confident_images} confident"
        parts.append(f"top1 {found.measures['top1']:.4f} (not graded)")
    return f"{', '.join(parts)} {counted}"
