"""Batches that mix images with preprocessed tensors, and items that ask for raw outputs."""

from __future__ import annotations

import numpy as np
import pytest

from serve.imaging.cpu_decode import to_model_input
from serve.model.batch import BatchItem, model_input_shape, run_batch, validate_item
from shared.errors import PermanentError
from tests.unit.serve.model.test_batch import CONFIG, GEOMETRY, FakeEngine, _loaded


def _tensor(value: int) -> np.ndarray:
    """The model input of a uniform image of ``value``, computed as the replica would."""
    pixels = np.full((1, 4, 4, 3), value, np.uint8)
    return to_model_input(pixels, CONFIG.input, CONFIG.preprocess)[0]


def test_preprocessed_tensors_and_images_share_one_engine_call() -> None:
    engine = FakeEngine()
    items = [
        BatchItem(np.full((4, 4, 3), 60, np.uint8), GEOMETRY, "3"),
        BatchItem(_tensor(200), GEOMETRY, "3", preprocessed=True),
        BatchItem(np.full((4, 4, 3), 130, np.uint8), GEOMETRY, "3"),
    ]

    outcomes = run_batch(_loaded(engine), items)

    assert engine.batches == [(3, 3, 4, 4)]
    assert [o.labels[0].class_id for o in outcomes] == [2, 7, 5]  # type: ignore[index]


def test_raw_items_get_their_own_row_of_every_output() -> None:
    items = [
        BatchItem(np.full((4, 4, 3), 10, np.uint8), GEOMETRY, "3", raw=True),
        BatchItem(np.full((4, 4, 3), 200, np.uint8), GEOMETRY, "3"),
    ]

    first, second = run_batch(_loaded(), items)

    assert first.outputs is not None and set(first.outputs) == {"logits"}
    assert first.outputs["logits"].shape == (10,) and first.outputs["logits"].argmax() == 0
    assert first.outputs["logits"].base is None  # a copy, not a view pinning the whole batch
    assert second.outputs is None


def test_a_preprocessed_tensor_must_have_the_models_input_shape_and_dtype() -> None:
    assert model_input_shape(CONFIG.input) == (3, 4, 4)
    validate_item(BatchItem(_tensor(1), GEOMETRY, "3", preprocessed=True), CONFIG)

    with pytest.raises(PermanentError, match=r"float32\[3, 4, 4\]"):
        validate_item(BatchItem(_tensor(1).astype(np.float64), GEOMETRY, "3", preprocessed=True), CONFIG)
    with pytest.raises(PermanentError, match=r"float32\[3, 4, 4\]"):
        validate_item(BatchItem(np.zeros((4, 4, 3), np.float32), GEOMETRY, "3", preprocessed=True), CONFIG)
