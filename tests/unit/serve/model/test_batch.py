"""One dynamic batch: one outcome per item, and one bad input cannot fail its neighbours."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest

from serve.engines.base import EngineFault
from serve.model.batch import (
    PROBE_ATTEMPTS,
    BatchItem,
    EngineFailure,
    LoadedVersion,
    retry_reason,
    run_batch,
    validate_item,
)
from serve.model_config import ModelConfig, parse_model_config
from serve.postprocess.base import ImageGeometry
from serve.postprocess.classification import TopKClassifier
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.results import Label

POISON = 255  # a pixel value the fake engine chokes on
LABELS = tuple(f"label_{i}" for i in range(10))
GEOMETRY = ImageGeometry(4, 4, 4, 4, 1.0, 1.0)
CONFIG = parse_model_config(
    {
        "task": "classification",
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "height": 4, "width": 4},
        "preprocess": {"scale": 1 / 255},
        "postprocess": {"kind": "classification", "output": "logits", "top_k": 3},
        "batching": {"max_batch_size": 8, "engine_batch_sizes": [1, 8]},
        "labels": None,
    },
    source="test",
)


class FakeEngine:
    """Logits whose winner is ``pixel // 26``; raises on a batch holding the poison value.

    ``broken`` raises on every batch, as a faulted device does; ``probes`` counts
    the all-black single images it was given.
    """

    def __init__(self, leading_extra: int = 0, broken: bool = False) -> None:
        self.batches: list[tuple[int, ...]] = []
        self.probes = 0
        self.closed = False
        self._leading_extra = leading_extra
        self._broken = broken

    @property
    def backend_name(self) -> str:
        return "fake:cpu"

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        self.batches.append(batch.shape)
        assert batch.dtype == np.float32 and batch.shape[1:] == (3, 4, 4)  # NCHW, normalized
        values = np.rint(batch[:, 0, 0, 0] * 255).astype(int)
        if batch.shape[0] == 1 and not batch.any():
            self.probes += 1
        if self._broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if (values == POISON).any():
            raise RuntimeError("CUDA error: illegal memory access")
        logits = np.zeros((len(values) + self._leading_extra, 10), np.float32)
        for i, v in enumerate(values):
            logits[i, v // 26] = 10.0
        return {"logits": logits}

    def close(self) -> None:
        self.closed = True


def _loaded(engine: FakeEngine | None = None, config: ModelConfig = CONFIG) -> LoadedVersion:
    return LoadedVersion(
        model="tiny",
        version="3",
        config=config,
        engine=engine or FakeEngine(),
        postprocess=TopKClassifier(config.postprocess),  # type: ignore[arg-type]
        labels=LABELS,
    )


def _item(value: int, enqueued_at: float = 100.0, version: str = "3") -> BatchItem:
    return BatchItem(np.full((4, 4, 3), value, np.uint8), GEOMETRY, version, enqueued_at)


def _clock(*times: float) -> Callable[[], float]:
    """An injected clock answering ``times`` in turn."""
    it = iter(times)
    return lambda: next(it)


def _winner(labels: Sequence[Label] | None) -> int:
    assert labels
    return labels[0].class_id


def test_each_item_gets_its_own_labels_in_order() -> None:
    engine = FakeEngine()
    items = [_item(10), _item(60), _item(200), _item(130)]

    outcomes = run_batch(_loaded(engine), items, clock=_clock(101.0, 101.25))

    assert [_winner(o.labels) for o in outcomes] == [0, 2, 7, 5]
    assert engine.batches == [(4, 3, 4, 4)]  # one engine call for the whole batch
    for outcome in outcomes:
        assert outcome.error_reason is None and outcome.detections is None
        assert outcome.batch_size == 4
        assert (outcome.version, outcome.backend) == ("3", "fake:cpu")
        assert outcome.inference_ms == pytest.approx(250.0)
        assert len(outcome.labels or []) == 3  # top_k
    assert outcomes[0].labels[0].label == "label_0"  # type: ignore[index]
    assert outcomes[0].labels[0].score == pytest.approx(1.0, abs=1e-3)  # type: ignore[index]


def test_queue_wait_is_measured_from_enqueued_at_with_the_injected_clock() -> None:
    items = [_item(10, enqueued_at=99.0), _item(20, enqueued_at=100.5)]

    outcomes = run_batch(_loaded(), items, clock=_clock(101.0, 101.0))

    assert [o.queue_wait_ms for o in outcomes] == [2000.0, 500.0]
    assert [o.inference_ms for o in outcomes] == [0.0, 0.0]


def test_a_poisoned_item_fails_alone_and_its_neighbours_get_labels() -> None:
    engine = FakeEngine()
    items = [_item(10), _item(POISON), _item(60)]

    outcomes = run_batch(_loaded(engine), items, clock=_clock(*[float(t) for t in range(200, 220)]))

    assert len(outcomes) == 3
    good_before, bad, good_after = outcomes
    assert _winner(good_before.labels) == 0 and good_before.error_reason is None
    assert _winner(good_after.labels) == 2 and good_after.error_reason is None
    assert bad.error_reason is ErrorReason.INFERENCE_FAILED
    assert bad.labels is None and bad.detections is None
    assert bad.error_message == "inference failed for this image: CUDA error: illegal memory access"
    assert bad.batch_size == 1
    # The whole batch once, then every item alone; the failing one is followed by a
    # probe with a blank image, which the engine passes, and by a second try of the
    # item, which fails again: the image is to blame.
    assert engine.batches == [(3, 3, 4, 4)] + [(1, 3, 4, 4)] * 5
    assert engine.probes == 1
    assert [o.batch_size for o in (good_before, good_after)] == [1, 1]


def test_a_single_poisoned_item_is_an_error_outcome_when_the_probe_passes() -> None:
    engine = FakeEngine()

    [outcome] = run_batch(_loaded(engine), [_item(POISON)])

    assert outcome.error_reason is ErrorReason.INFERENCE_FAILED
    assert outcome.backend == "fake:cpu"
    assert engine.probes == 1


def test_an_engine_failing_the_blank_probe_too_is_an_engine_failure() -> None:
    engine = FakeEngine(broken=True)

    with pytest.raises(EngineFailure) as info:
        run_batch(_loaded(engine), [_item(10)])

    assert isinstance(info.value, TransientError)  # the input is retried, not recorded
    assert "fails on a blank image too" in str(info.value)
    assert "tiny/3" in str(info.value) and "fake:cpu" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert engine.probes == PROBE_ATTEMPTS
    assert not info.value.sticky  # counted against the version, not a dead device


def test_a_broken_engine_fails_a_whole_batch_without_blaming_any_item() -> None:
    engine = FakeEngine(broken=True)

    with pytest.raises(EngineFailure):
        run_batch(_loaded(engine), [_item(10), _item(60), _item(130)])

    # The batch, the first item alone and its probes: no further item is tried.
    assert engine.batches == [(3, 3, 4, 4), (1, 3, 4, 4)] + [(1, 3, 4, 4)] * PROBE_ATTEMPTS
    assert engine.probes == PROBE_ATTEMPTS


def test_an_engine_returning_the_wrong_leading_dimension_is_an_engine_failure() -> None:
    engine = FakeEngine(leading_extra=1)

    # The blank-image probe gets a wrong shape too: the engine is at fault, not the images.
    with pytest.raises(EngineFailure, match="leading dimension"):
        run_batch(_loaded(engine), [_item(10), _item(60)])


def test_a_postprocess_failure_fails_only_its_item() -> None:
    class Picky(TopKClassifier):
        def __call__(self, outputs, geometry, labels):  # type: ignore[no-untyped-def]
            if int(np.argmax(outputs["logits"])) == 7:
                raise IndexError("boom")
            return super().__call__(outputs, geometry, labels)

    loaded = _loaded()
    loaded.postprocess = Picky(CONFIG.postprocess)  # type: ignore[arg-type]

    outcomes = run_batch(loaded, [_item(10), _item(200), _item(60)])

    assert [o.error_reason for o in outcomes] == [None, ErrorReason.INFERENCE_FAILED, None]
    assert "postprocessing failed: boom" in (outcomes[1].error_message or "")
    assert _winner(outcomes[2].labels) == 2


def test_a_detection_model_with_nothing_found_reports_no_detections() -> None:
    config = parse_model_config(
        {
            "task": "detection",
            "input": {"height": 4, "width": 4},
            "postprocess": {"kind": "mask", "output": "logits"},
            "labels": None,
        },
        source="test",
    )
    loaded = _loaded(config=config)
    loaded.postprocess = lambda outputs, geometry, labels: []  # type: ignore[assignment]

    [outcome] = run_batch(loaded, [_item(10)])

    assert outcome.detections == [] and outcome.labels is None
    assert outcome.error_reason is None


def test_validate_item_accepts_a_matching_tensor() -> None:
    validate_item(_item(3), CONFIG)


@pytest.mark.parametrize(
    ("pixels", "shown"),
    [
        (np.zeros((4, 4, 3), np.float32), "float32[4, 4, 3]"),
        (np.zeros((4, 5, 3), np.uint8), "uint8[4, 5, 3]"),
        (np.zeros((4, 4), np.uint8), "uint8[4, 4]"),
        (np.zeros((3, 4, 4), np.uint8), "uint8[3, 4, 4]"),
    ],
)
def test_validate_item_rejects_a_tensor_that_cannot_join_the_batch(
    pixels: np.ndarray, shown: str
) -> None:
    with pytest.raises(PermanentError) as info:
        validate_item(BatchItem(pixels, GEOMETRY, "3"), CONFIG)

    assert info.value.reason is ErrorReason.INFERENCE_FAILED
    assert shown in info.value.message
    assert "uint8[4, 4, 3]" in info.value.message


def test_an_engine_fault_fails_the_batch_as_an_engine_failure_without_blaming_items() -> None:
    from serve.engines.base import EngineFault

    class Faulty(FakeEngine):
        def infer(self, batch):  # type: ignore[no-untyped-def]
            self.batches.append(batch)
            raise EngineFault("cudaErrorIllegalAddress")

    engine = Faulty()
    with pytest.raises(EngineFailure, match="cudaErrorIllegalAddress"):
        run_batch(_loaded(engine), [_item(10), _item(60)])
    assert len(engine.batches) == 1  # no per-item retries on a dead device


class FlakyEngine(FakeEngine):
    """Fails the calls whose (1-based) numbers are in ``failing``, with ``error``."""

    def __init__(self, failing: set[int], error: Exception) -> None:
        super().__init__()
        self._failing, self._error, self.calls = failing, error, 0

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        self.calls += 1
        if self.calls in self._failing:
            self.batches.append(batch.shape)
            raise self._error
        return super().infer(batch)


def test_an_intermittent_device_error_does_not_condemn_a_good_image() -> None:
    # The batch and the item alone fail, the probe passes, the item's second try passes.
    engine = FlakyEngine({1, 2}, RuntimeError("CUDA error: unspecified launch failure"))

    outcomes = run_batch(_loaded(engine), [_item(10), _item(60)])

    assert [o.error_reason for o in outcomes] == [None, None]
    assert [_winner(o.labels) for o in outcomes] == [0, 2]


def test_a_probe_that_fails_once_does_not_blame_the_engine() -> None:
    # Item alone fails (1), first probe fails (2), second probe passes, item passes.
    engine = FlakyEngine({1, 2}, RuntimeError("cudnn status execution failed"))

    [outcome] = run_batch(_loaded(engine), [_item(10)])

    assert outcome.error_reason is None and _winner(outcome.labels) == 0


@pytest.mark.parametrize("error", [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 20 MiB")])
def test_out_of_memory_blames_nobody_the_item_is_retried(error: Exception) -> None:
    engine = FlakyEngine({1, 2, 3, 4}, error)

    outcomes = run_batch(_loaded(engine), [_item(10), _item(60)])

    assert all(o.error_reason is None and o.retry_message for o in outcomes)
    assert all("out of memory" in (o.retry_message or "") for o in outcomes)
    assert engine.probes == 0  # memory pressure says nothing about the engine


def test_a_sticky_device_fault_is_a_sticky_engine_failure() -> None:
    engine = FlakyEngine({1}, EngineFault("device lost"))

    with pytest.raises(EngineFailure) as info:
        run_batch(_loaded(engine), [_item(10)])

    assert info.value.sticky


def test_the_retry_reason_names_memory_or_a_transient_failure_and_nothing_else() -> None:
    assert retry_reason(MemoryError("host"), "gpu0") == "out of memory on gpu0: host"
    assert retry_reason(RuntimeError("CUDA error: out of memory"), "gpu0") == (
        "out of memory on gpu0: CUDA error: out of memory"
    )
    assert retry_reason(TransientError("decoder busy"), "nvjpeg") == "transient failure on nvjpeg: decoder busy"
    assert retry_reason(ValueError("bad pixels"), "gpu0") is None
