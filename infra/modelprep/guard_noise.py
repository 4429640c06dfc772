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
    ``int8-weights`` (weights quantized per output channel to 8 bits, as TensorRT's INT8),
    ``int8-static`` (ONNX Runtime's post-training INT8: per-channel weights, uint8
    activations calibrated with MinMax on the version's ``calibration/`` images);
broken (must fail)
    ``int8-per-tensor-weights`` (one scale per tensor: what a poor INT8 recipe does to
    MobileNet's depthwise convolutions), ``int5-weights`` (per channel, 5 bits),
    ``logit-noise`` (N(0, 1) added to every logit), ``shuffled-labels`` (logits permuted);
not judged
    ``int8-static-symmetric`` (the same with TensorRT's symmetric int8 activations: with
    MinMax ranges from texture photos it changes too many answers, and is refused).

Run it from the repository root after ``make model``::

    python -m infra.modelprep.guard_noise build/model-repository/mobilenet_v2/1 \\
        --validation infra/models/mobilenet_v2/1/validation \\
        --config infra/models/mobilenet_v2/1/config.yaml

Measured on MobileNetV2 (``build/model-repository/mobilenet_v2/1``) and the 256 shipped
views, onnxruntime 1.32.0 on a 2-vCPU x86 machine, thresholds 0.95 / 0.85 / 0.98 with a
confident margin of 0.2 (134 of 256 images confident); ``top1`` is plain top-1 agreement,
shown for comparison and not graded:

==========================  =======  ======  ==============  ============  ============
engine                      kind     top1    top1_confident  top5_overlap  logit_cosine
==========================  =======  ======  ==============  ============  ============
fp32-1-thread               correct  1.0000  1.0000          1.0000        1.0000
fp32-graph-optimised        correct  1.0000  1.0000          1.0000        1.0000
fp16-weights                correct  0.9922  1.0000          0.9969        1.0000
int8-weights                correct  0.8906  0.9925          0.9367        0.9945
int8-static                 correct  0.8125  0.9627          0.8859        0.9874
int8-per-tensor-weights     broken   0.6914  0.8582          0.8227        0.9679
int5-weights                broken   0.4453  0.6194          0.5781        0.8207
logit-noise                 broken   0.6289  0.7910          0.7969        0.9424
shuffled-labels             broken   0.0000  0.0000          0.0008        0.0099
int8-static-symmetric       ?        0.7070  0.8881          0.8500        0.9758
==========================  =======  ======  ==============  ============  ============

Plain top-1 agreement cannot tell the two kinds apart: correct INT8 engines score 0.81-0.89,
close to mild damage, and FP16 clears the old 0.98 threshold by two images; the graded
measures separate them with room on both sides.
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
from serve.model.validation import IMAGE_SUFFIXES, calibration_set, validation_set
from serve.model_config import load_model_config

__all__ = [
    "BROKEN",
    "CORRECT",
    "OPEN",
    "OrtEngine",
    "Perturbation",
    "Replay",
    "load_version",
    "measure_all",
    "quantized_weights",
    "shuffled_logits",
    "statically_quantized",
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


def statically_quantized(model: bytes, calibration: Sequence[np.ndarray], symmetric: bool) -> bytes:
    """``model`` quantized to INT8 by ONNX Runtime's post-training static quantization (QDQ
    format): weights per output channel, activations per tensor with MinMax ranges from
    ``calibration``; ``symmetric`` activations are TensorRT's INT8 scheme, asymmetric
    (uint8) ONNX Runtime's default. The QDQ model runs on the FP32 CPU kernels."""
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    name = onnx.load_from_string(model).graph.input[0].name
    images = [{name: batch[i : i + 1]} for batch in calibration for i in range(len(batch))]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(images)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.rows, None)

    with tempfile.TemporaryDirectory(prefix="guard-noise-") as work:
        source, target = Path(work) / "fp32.onnx", Path(work) / "int8.onnx"
        source.write_bytes(model)
        quantize_static(
            str(source),
            str(target),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
        return target.read_bytes()


@dataclass(frozen=True, slots=True)
class Perturbation:
    """A named way to make a candidate engine from the ONNX model's bytes and the version's
    INT8 calibration batches."""

    name: str
    make: Callable[[bytes, Sequence[np.ndarray]], OrtEngine]


CORRECT = (
    Perturbation("fp32-1-thread", lambda m, _: OrtEngine(m, threads=1)),
    Perturbation("fp32-graph-optimised", lambda m, _: OrtEngine(m, optimise=True)),
    Perturbation("fp16-weights", lambda m, _: OrtEngine(quantized_weights(m, None))),
    Perturbation("int8-weights", lambda m, _: OrtEngine(quantized_weights(m, 8))),
    Perturbation("int8-static", lambda m, c: OrtEngine(statically_quantized(m, c, False))),
)
BROKEN = (
    Perturbation(
        "int8-per-tensor-weights",
        lambda m, _: OrtEngine(quantized_weights(m, 8, per_channel=False)),
    ),
    Perturbation("int5-weights", lambda m, _: OrtEngine(quantized_weights(m, 5))),
    Perturbation("logit-noise", lambda m, _: OrtEngine(m, transform=logit_noise(1.0))),
    Perturbation("shuffled-labels", lambda m, _: OrtEngine(m, transform=shuffled_logits())),
)
#: Measured and printed, not judged: which side it falls on is what the guard is for.
OPEN = (
    Perturbation("int8-static-symmetric", lambda m, c: OrtEngine(statically_quantized(m, c, True))),
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
    *,
    calibrate: bool = True,
) -> dict[str, tuple[Mapping[str, float], int, bool]]:
    """``{name: (measures, confident images, passed)}`` of each perturbation against the
    guard's reference, with ``guard`` (default: the version's config) deciding ``passed``;
    ``calibrate`` reads the version's ``calibration/`` images for the INT8 ones."""
    data = validation_set(mv, list(images))
    if data is None:
        raise ValueError(f"no validation images for {mv.name}/{mv.version}")
    guard = guard or data.guard or AccuracyGuard()
    model = mv.onnx_path.read_bytes()
    # The calibration cache path is only named, never written: nothing here runs TensorRT.
    calibrating = calibration_set(mv, mv.directory) if calibrate else None
    calibration = list(calibrating.batches) if calibrating else []
    reference = Replay(OrtEngine(model, threads=2))
    results = {}
    for perturbation in perturbations:
        candidate = perturbation.make(model, calibration)
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
    results = measure_all(mv, images, (*CORRECT, *BROKEN, *OPEN), guard)
    names = ("top1", "top1_confident", "top5_overlap", "logit_cosine")
    out = sys.stdout
    out.write(f"{mv.name}/{mv.version}: {len(images)} images from {folder}; {guard}\n")
    out.write(f"| engine | kind | {' | '.join(names)} | confident | verdict |\n")
    out.write(f"|{'---|' * (len(names) + 4)}\n")
    for perturbation in (*CORRECT, *BROKEN, *OPEN):
        measures, confident, passed = results[perturbation.name]
        kind = "correct" if perturbation in CORRECT else "broken" if perturbation in BROKEN else "?"
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
