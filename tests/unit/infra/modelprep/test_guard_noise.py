"""The engines the noise measurement compares: rounding, quantization and label shuffling
do what their names say (on the tiny test classifier, milliseconds each)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from infra.modelprep.guard_noise import (
    OrtEngine,
    Replay,
    quantized_weights,
    shuffled_logits,
    statically_quantized,
)
from serve.engines.accuracy_guard import output_cosine
from tests.unit.serve.engines.onnx_models import classifier_onnx, images


def _weight(model: bytes) -> np.ndarray:
    inits = {
        i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(model).graph.initializer
    }
    return inits["W"]


def test_fp16_rounding_and_int_quantization_of_the_weights() -> None:
    model = classifier_onnx()
    original = _weight(model)
    fp16 = _weight(quantized_weights(model, None))
    assert np.array_equal(fp16, original.astype(np.float16).astype(np.float32))
    int8 = _weight(quantized_weights(model, 8))
    for channel in range(int8.shape[0]):  # one scale per output channel (axis 0)
        levels = np.unique(int8[channel])
        step = np.abs(original[channel]).max() / 127
        assert len(levels) <= 255
        assert np.allclose(int8[channel] / step, np.round(int8[channel] / step), atol=1e-3)
    assert np.abs(int8 - original).max() <= np.abs(original).max() / 127
    coarse = _weight(quantized_weights(model, 3, per_channel=False))
    assert len(np.unique(coarse)) <= 7  # 3 bits: -3..3 times one scale
    assert _weight(quantized_weights(model, 8)).dtype == np.float32


def test_shuffled_labels_keep_the_values_in_another_order() -> None:
    permute = shuffled_logits(seed=4)
    logits = {"logits": np.arange(20, dtype=np.float32).reshape(2, 10)}
    first, again = permute(logits)["logits"], permute(logits)["logits"]
    assert np.array_equal(first, again)  # one fixed permutation
    assert sorted(first[0]) == list(range(10)) and not np.array_equal(first, logits["logits"])


def test_static_int8_runs_and_stays_close_to_fp32() -> None:
    model = classifier_onnx()
    batch = images(8, seed=5)
    reference = Replay(OrtEngine(model))
    quantized = OrtEngine(statically_quantized(model, [images(8, seed=6)], symmetric=False))
    ours, theirs = quantized.infer(batch)["logits"], reference.infer(batch)["logits"]
    assert reference.infer(batch) is reference.infer(batch)  # replayed, not rerun
    cosines = [output_cosine({"l": a}, {"l": b}) for a, b in zip(theirs, ours, strict=True)]
    assert min(cosines) > 0.95 and not np.array_equal(ours, theirs)
