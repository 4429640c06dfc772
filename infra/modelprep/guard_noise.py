"""Measuring the accuracy guard's noise floor, to set its thresholds.

A threshold means something only between two measurements: how far a *correct*
engine strays from the guard's reference (FP32 ONNX Runtime on the CPU, graph
optimisations off), and how far a *broken* one does. This module runs the guard's
measures (``serve/engines/accuracy_guard.py``) on a model version's validation set for
both kinds, all on the CPU with ONNX Runtime:

correct (must pass)
    ``fp32-1-thread`` (the reference on 1 intra-op thread instead of 2),
    ``fp32-graph-optimised`` (ORT_ENABLE_ALL, as the served ONNX Runtime engine runs),
    ``fp16-weights`` (every weight rounded to FP16),
    ``int8-weights`` (weights quantized per output channel to 8 bits, as TensorRT's INT8);
broken (must fail)
    ``int8-per-tensor-weights`` (one scale per tensor: what a poor INT8 recipe does to
    MobileNet's depthwise convolutions), ``int5-weights`` (per channel, 5 bits),
    ``logit-noise`` (N(0, 1) added to every logit), ``shuffled-labels`` (logits permuted).

Run it from the repository root after ``make model``::

    python -m infra.modelprep.guard_noise build/model-repository/mobilenet_v2/1 \\
        --validation infra/models/mobilenet_v2/1/validation \\
        --config infra/models/mobilenet_v2/1/config.yaml

The CUDA engine (FP32 on the GPU, and TensorRT FP16/INT8) is measured by
``make gpu-check`` when a GPU is available; it is not part of this table.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from serve.engines.accuracy_guard import AccuracyGuard, AccuracyGuardError
from serve.model.repository import ModelVersion
from serve.model.validation import IMAGE_SUFFIXES, validation_set
from serve.model_config import load_model_config

__all__ = [
    "BROKEN",
    "CORRECT",
    "OrtEngine",
    "Perturbation",
    "Replay",
    "load_version",
    "measure_all",
    "quantized_weights",
    "shuffled_logits",
]


class OrtEngine:
    """A bare ONNX Runtime CPU session with the :class:`~serve.engines.base.Engine` surface."""

    backend_name = "onnxruntime:CPUExecutionProvider"

    def __init__(
        self,
        model: bytes | str,
        *,
        threads: int = 2,
        optimise: bool = False,
        transform: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            if optimise
            else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.transform = transform

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        values = self.session.run(self.outputs, {self.input: batch})
        out = dict(zip(self.outputs, values, strict=True))
        return self.transform(out) if self.transform else out

    def close(self) -> None:
        self.session = None


class Replay:
    """The reference's outputs, computed once per batch and replayed for every candidate."""

    backend_name = "replay"

    def __init__(self, engine: OrtEngine) -> None:
        self.engine = engine
        self.seen: dict[int, dict[str, np.ndarray]] = {}

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        key = id(batch)
        if key not in self.seen:
            self.seen[key] = self.engine.infer(batch)
        return self.seen[key]

    def close(self) -> None:
        self.engine.close()


def quantized_weights(model: bytes, bits: int | None, per_channel: bool = True) -> bytes:
    """``model`` with every weight tensor (rank >= 2) rounded: to FP16 when ``bits`` is
    ``None``, else to symmetric ``bits``-bit integers, one scale per output channel (axis
    0) or per tensor, and back to FP32, so the model still runs on the FP32 CPU kernels."""
    proto = onnx.load_from_string(model)
    for init in proto.graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.ndim < 2 or weights.dtype != np.float32:
            continue
        if bits is None:
            rounded = weights.astype(np.float16).astype(np.float32)
        else:
            levels = 2 ** (bits - 1) - 1
            axes = tuple(range(1, weights.ndim)) if per_channel else None
            scale = np.abs(weights).max(axis=axes, keepdims=per_channel) / levels
            scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
            rounded = (np.clip(np.round(weights / scale), -levels, levels) * scale).astype(
                np.float32
            )
        init.CopyFrom(numpy_helper.from_array(rounded, init.name))
    return proto.SerializeToString()


def shuffled_logits(seed: int = 0) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Permutes every output's last axis with one fixed permutation (labels out of order)."""
    rng = np.random.default_rng(seed)
    permutations: dict[int, np.ndarray] = {}

    def permute(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = {}
        for name, value in out.items():
            size = value.shape[-1]
            order = permutations.setdefault(size, rng.permutation(size))
            result[name] = value[..., order]
        return result

    return permute


def logit_noise(
    scale: float, seed: int = 0
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Adds N(0, ``scale``) to every output value."""
    rng = np.random.default_rng(seed)
    return lambda out: {
        k: (v + rng.normal(0, scale, v.shape)).astype(v.dtype) for k, v in out.items()
    }


@dataclass(frozen=True, slots=True)
class Perturbation:
    """A named way to make a candidate engine from the ONNX model's bytes."""

    name: str
    make: Callable[[bytes], OrtEngine]


CORRECT = (
    Perturbation("fp32-1-thread", lambda m: OrtEngine(m, threads=1)),
    Perturbation("fp32-graph-optimised", lambda m: OrtEngine(m, optimise=True)),
    Perturbation("fp16-weights", lambda m: OrtEngine(quantized_weights(m, None))),
    Perturbation("int8-weights", lambda m: OrtEngine(quantized_weights(m, 8))),
)
BROKEN = (
    Perturbation(
        "int8-per-tensor-weights", lambda m: OrtEngine(quantized_weights(m, 8, per_channel=False))
    ),
    Perturbation("int5-weights", lambda m: OrtEngine(quantized_weights(m, 5))),
    Perturbation("logit-noise", lambda m: OrtEngine(m, transform=logit_noise(1.0))),
    Perturbation("shuffled-labels", lambda m: OrtEngine(m, transform=shuffled_logits())),
)


def load_version(directory: Path, config_path: Path | None = None) -> ModelVersion:
    """The model version in ``directory`` (``model.onnx``, labels, and ``config.yaml``
    unless ``config_path`` names another)."""
    config = load_model_config(config_path or directory / "config.yaml")
    labels: tuple[str, ...] = ()
    if config.labels:
        labels = tuple((directory / config.labels).read_text().splitlines())
    return ModelVersion(directory.parent.name, directory.name, config, directory, labels)


def measure_all(
    mv: ModelVersion,
    images: Sequence[Path],
    perturbations: Sequence[Perturbation],
    guard: AccuracyGuard | None = None,
) -> dict[str, tuple[Mapping[str, float], int, bool]]:
    """``{name: (measures, confident images, passed)}`` of each perturbation against the
    guard's reference, with ``guard`` (default: the version's config) deciding ``passed``."""
    data = validation_set(mv, list(images))
    if data is None:
        raise ValueError(f"no validation images for {mv.name}/{mv.version}")
    guard = guard or data.guard or AccuracyGuard()
    model = mv.onnx_path.read_bytes()
    reference = Replay(OrtEngine(model, threads=2))
    results = {}
    for perturbation in perturbations:
        candidate = perturbation.make(model)
        try:
            verdict = guard.check(
                candidate,
                reference,
                data.batches,
                data.postprocess,
                model=mv.name,
                version=mv.version,
                precision=perturbation.name,
            )
        except AccuracyGuardError as err:
            if err.verdict is None:
                raise
            verdict = err.verdict
        finally:
            candidate.close()
        results[perturbation.name] = (verdict.measures, verdict.confident_images, verdict.passed)
    reference.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Measure the accuracy guard's noise floor.")
    parser.add_argument("version_dir", type=Path, help="e.g. build/model-repository/mobilenet_v2/1")
    parser.add_argument("--validation", type=Path, help="image folder (default: the version's)")
    parser.add_argument("--config", type=Path, help="config.yaml (default: the version's)")
    args = parser.parse_args(argv)
    mv = load_version(args.version_dir, args.config)
    folder = args.validation or mv.directory / mv.config.accuracy_guard.validation_dir
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    guard = AccuracyGuard.from_spec(mv.config.accuracy_guard)
    results = measure_all(mv, images, (*CORRECT, *BROKEN), guard)
    names = ("top1", "top1_confident", "top5_overlap", "logit_cosine")
    out = sys.stdout
    out.write(f"{mv.name}/{mv.version}: {len(images)} images from {folder}; {guard}\n")
    out.write(f"| engine | kind | {' | '.join(names)} | confident | verdict |\n")
    out.write(f"|{'---|' * (len(names) + 4)}\n")
    for perturbation in (*CORRECT, *BROKEN):
        measures, confident, passed = results[perturbation.name]
        kind = "correct" if perturbation in CORRECT else "broken"
        cells = " | ".join(f"{measures[n]:.4f}" for n in names)
        verdict = "pass" if passed else "refused"
        out.write(f"| {perturbation.name} | {kind} | {cells} | {confident} | {verdict} |\n")
    wrong = [p.name for p in CORRECT if not results[p.name][2]] + [
        p.name for p in BROKEN if results[p.name][2]
    ]
    if wrong:
        out.write(f"thresholds misjudge: {', '.join(wrong)}\n")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
