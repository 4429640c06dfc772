"""Running one dynamic batch: plain functions, testable without a Ray cluster.

The model deployment's ``@serve.batch`` method hands a list of
:class:`BatchItem` here and gets back exactly one :class:`ItemOutcome` per item,
in order. Items were validated before they joined the batch; if the engine
still fails on a batch, each item is retried alone so that one bad input cannot
fail its neighbours.

Fault attribution, when an item fails alone:

- an out-of-memory error (host or device) blames nobody: the item is retried later;
- otherwise a blank image is run (the *probe*), up to :data:`PROBE_ATTEMPTS` times:
  if it never succeeds the engine is at fault (:class:`EngineFailure`); one probe
  that fails and one that passes is an intermittent fault, not the engine's;
- after a passing probe the item runs once more: only an item that fails again,
  with an error that is not out-of-memory, is recorded as ``inference_failed``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from serve.engines.base import Engine, EngineFault
from serve.engines.errors import is_out_of_memory
from serve.imaging.cpu_decode import to_model_input
from serve.model_config import InputSpec, ModelConfig
from serve.postprocess.base import ImageGeometry, Postprocessor
from shared.errors import ErrorReason, PermanentError, TransientError
from shared.messages import Priority
from shared.results import Detection, Label

logger = logging.getLogger(__name__)

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One image waiting for the model.

    ``pixels`` is uint8 HWC at model size, or, when ``preprocessed``, the model's own
    input for one image (the input spec's layout and dtype, no batch dimension).
    ``raw`` asks for the engine's output tensors of this item besides its labels or
    detections (the Open Inference Protocol returns them). ``deadline`` (wall-clock
    seconds) is this item's caller's own, when calls were merged; the call's otherwise.
    ``priority`` is its request's traffic class (the batch queue serves live first).
    ``default_prepared_as`` is set when the caller asked for the model's default version,
    not for ``version`` by name: the :func:`~serve.model_config.preparation_key` the pixels
    were prepared under. A replica that has not promoted ``version`` yet (a rollout in
    progress) then serves the item with its own default if that one prepares alike.
    """

    pixels: np.ndarray
    geometry: ImageGeometry
    version: str
    enqueued_at: float = field(default_factory=time.monotonic)
    preprocessed: bool = False
    raw: bool = False
    deadline: float | None = None
    priority: Priority = Priority.LIVE
    default_prepared_as: str | None = None


@dataclass(frozen=True, slots=True)
class EncodedItem:
    """One image waiting for the model as its fetched bytes, undecoded.

    Sent to a version whose replica decodes on its GPU (``VersionInfo.decode`` is not
    ``cpu``): the replica decodes, resizes and normalizes whole batches after its queue
    formed them (:mod:`serve.model.encoded_batch`). ``deadline`` and ``priority`` as in
    :class:`BatchItem`; ``default_ok``: the caller asked for the default version, so a
    replica that has not promoted ``version`` yet may serve the bytes with its own default.
    """

    data: bytes
    version: str
    enqueued_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None
    priority: Priority = Priority.LIVE
    default_ok: bool = False


#: Either kind of item a model replica takes.
AnyItem = BatchItem | EncodedItem


@dataclass(frozen=True, slots=True)
class ItemOutcome:
    """What the model deployment returns for one item."""

    version: str
    backend: str
    labels: list[Label] | None = None
    detections: list[Detection] | None = None
    queue_wait_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0
    error_reason: ErrorReason | None = None
    error_message: str | None = None
    outputs: dict[str, np.ndarray] | None = None  # this item's engine outputs, for ``raw`` items
    # Set when the item could not be run for a reason that is not its own (out of
    # memory, an intermittent device error): it is to be retried, nothing recorded.
    retry_message: str | None = None
    # Who decoded the image: ``nvimgcodec:cuda:N`` on the replica's GPU, ``cpu`` otherwise.
    decode: str = "cpu"
    # Milliseconds the replica spent decoding this item's batch (device decode only).
    decode_ms: float | None = None
    # Where the engine came from: the engine cache's ``memory``/``disk``/``gcs``/``shared``, or ``built``.
    engine_source: str | None = None


@dataclass(slots=True)
class LoadedVersion:
    """An engine plus what is needed around it for one model version."""

    model: str
    version: str
    config: ModelConfig
    engine: Engine
    postprocess: Postprocessor
    labels: Sequence[str]
    # Engine output name -> (dtype, shape without the batch dimension), seen at warm-up.
    output_specs: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    # The GPU batch preparer when this replica decodes on the device (serve.model.device_decode).
    preparer: Any = None
    # Where the engine came from (the engine cache's report level), ``unknown`` when not told.
    engine_source: str = "unknown"
    # Why a preferred backend was refused (an accuracy-guard verdict), when this one is a fallback.
    fallback_reason: str | None = None

    @property
    def decode(self) -> str:
        """``nvimgcodec:cuda:N`` when batches of bytes are decoded on the GPU, else ``cpu``."""
        return self.preparer.name if self.preparer is not None else "cpu"


def model_input_shape(spec: InputSpec) -> tuple[int, ...]:
    """The model's input tensor shape for one image (no batch dimension)."""
    if spec.layout == "NCHW":
        return (spec.channels, spec.height, spec.width)
    return (spec.height, spec.width, spec.channels)


def validate_item(item: BatchItem, config: ModelConfig) -> None:
    """Reject an item whose tensor cannot join a batch of this model version."""
    if item.preprocessed:
        dtype, expected = np.dtype(config.input.dtype), model_input_shape(config.input)
    else:
        dtype, expected = np.dtype(np.uint8), (config.input.height, config.input.width, config.input.channels)
    if item.pixels.dtype != dtype or item.pixels.shape != expected:
        raise PermanentError(
            ErrorReason.INFERENCE_FAILED,
            f"tensor {item.pixels.dtype}{list(item.pixels.shape)} does not fit input "
            f"{dtype}{list(expected)} of this model version",
        )


def _postprocess_one(
    loaded: LoadedVersion, outputs: dict[str, np.ndarray], index: int, geometry: ImageGeometry
) -> tuple[list[Label] | None, list[Detection] | None]:
    per_image = {name: value[index] for name, value in outputs.items()}
    found = loaded.postprocess(per_image, geometry, loaded.labels)
    if found and isinstance(found[0], Detection):
        return None, list(found)  # type: ignore[arg-type]
    if loaded.config.task.value == "detection":
        return None, []
    return list(found), None  # type: ignore[arg-type]


def _model_input(loaded: LoadedVersion, items: Sequence[BatchItem]) -> np.ndarray:
    """The batch tensor: images are normalized together, preprocessed items go in as they are."""
    spec, pre = loaded.config.input, loaded.config.preprocess
    images = [i for i, item in enumerate(items) if not item.preprocessed]
    if len(images) == len(items):
        return to_model_input(np.stack([item.pixels for item in items]), spec, pre)
    tensor = np.empty((len(items), *model_input_shape(spec)), dtype=spec.dtype)
    for i, item in enumerate(items):
        if item.preprocessed:
            tensor[i] = item.pixels
    if images:
        tensor[images] = to_model_input(np.stack([items[i].pixels for i in images]), spec, pre)
    return tensor


def _infer(loaded: LoadedVersion, items: Sequence[BatchItem]) -> dict[str, np.ndarray]:
    tensor = _model_input(loaded, items)
    outputs = {k: np.asarray(v) for k, v in loaded.engine.infer(tensor).items()}
    for name, value in outputs.items():
        if value.shape[:1] != (len(items),):
            raise RuntimeError(
                f"engine output {name!r} has leading dimension {value.shape[:1]}, "
                f"expected {len(items)}"
            )
    return outputs


#: Blank-image probes before the engine is blamed: one failing probe may be an intermittent fault.
PROBE_ATTEMPTS = 2


class EngineFailure(TransientError):
    """The engine failed on a known-good input: a device or engine fault, not a bad image.

    Transient: the items are retried. ``sticky`` is true when the engine reported
    its device gone (the replica must be replaced); otherwise the fault counts
    against the version (see :mod:`serve.model.model_server`).
    """

    def __init__(self, message: str, *, sticky: bool = False) -> None:
        super().__init__(message)
        self.sticky = sticky


def device_lost(loaded: LoadedVersion, err: EngineFault) -> EngineFailure:
    """The engine says its device is gone (a sticky CUDA error): no input is to blame."""
    return EngineFailure(
        f"engine {loaded.engine.backend_name} for {loaded.model}/{loaded.version}: {err}", sticky=True
    )


def retry_reason(err: BaseException, runs_on: str) -> str | None:
    """Why a failure with ``err`` is no input's fault and worth retrying (memory ran out on
    ``runs_on``, or the error is transient), or None when it may be the input's."""
    if is_out_of_memory(err):
        return f"out of memory on {runs_on}: {err}"
    if isinstance(err, TransientError):
        return f"transient failure on {runs_on}: {err}"
    return None


def run_batch(
    loaded: LoadedVersion, items: Sequence[BatchItem], clock: Callable[[], float] = time.monotonic
) -> list[ItemOutcome]:
    """Infer ``items`` (all of ``loaded``'s version) and postprocess each; one outcome per item.

    When the engine raises, each item is retried alone and blamed only as the
    module docstring describes: no input gets an error record for a fault that
    is not its own.

    Raises:
        EngineFailure: the engine fails on a known-good input too.
    """
    started = clock()
    try:
        outputs = _infer(loaded, items)
    except EngineFault as err:
        raise device_lost(loaded, err) from err
    except Exception as err:  # noqa: BLE001 - isolate the failing item(s) below
        if len(items) == 1:
            item = items[0]
            return [
                isolate(
                    loaded, item, err, started, loaded.engine.backend_name,
                    run_alone=lambda: _infer(loaded, [item]),
                    outcome_of=lambda outputs: _outcomes(
                        loaded, [item], outputs, started, (clock() - started) * 1000
                    )[0],
                )  # fmt: skip
            ]
        logger.warning("batch of %d failed; retrying items one by one", len(items), exc_info=True)
        return [outcome for item in items for outcome in run_batch(loaded, [item], clock)]
    return _outcomes(loaded, items, outputs, started, (clock() - started) * 1000)


def _outcomes(
    loaded: LoadedVersion, items: Sequence[BatchItem], outputs: dict[str, np.ndarray], started: float,
    inference_ms: float,
) -> list[ItemOutcome]:  # fmt: skip
    outcomes = []
    for i, item in enumerate(items):
        try:
            labels, detections = _postprocess_one(loaded, outputs, i, item.geometry)
        except Exception as err:  # noqa: BLE001 - a postprocess bug must not fail neighbours
            logger.exception("postprocessing failed for %s/%s", loaded.model, loaded.version)
            outcomes.append(failed_outcome(loaded, item, started, f"postprocessing failed: {err}"))
            continue
        outcomes.append(
            ItemOutcome(
                version=loaded.version,
                backend=loaded.engine.backend_name,
                engine_source=loaded.engine_source,
                labels=labels,
                detections=detections,
                queue_wait_ms=round((started - item.enqueued_at) * 1000, 3),
                inference_ms=round(inference_ms, 3),
                batch_size=len(items),
                outputs={name: np.array(value[i]) for name, value in outputs.items()} if item.raw else None,
            )
        )
    return outcomes


def isolate(
    loaded: LoadedVersion,
    item: AnyItem,
    cause: Exception,
    started: float,
    runs_on: str,
    run_alone: Callable[[], R],
    outcome_of: Callable[[R], ItemOutcome],
) -> ItemOutcome:
    """Decide who is to blame for ``item`` failing alone with ``cause`` (see the module
    docstring): ``run_alone()`` runs it once more after a passing probe, ``outcome_of``
    turns what that returns into its outcome; ``runs_on`` names what it ran on."""
    if (reason := retry_reason(cause, runs_on)) is not None:
        logger.warning("running one item of %s/%s: %s", loaded.model, loaded.version, reason)
        return retry_outcome(loaded, item, started, reason)
    probe_engine(loaded, cause)
    try:
        result = run_alone()
    except EngineFault as err:
        raise device_lost(loaded, err) from err
    except Exception as err:  # noqa: BLE001 - the second failure alone on a healthy engine
        if (reason := retry_reason(err, runs_on)) is not None:
            return retry_outcome(loaded, item, started, reason)
        logger.exception("inference failed for a single item of %s/%s", loaded.model, loaded.version)
        return failed_outcome(loaded, item, started, f"inference failed for this image: {err}")
    logger.warning(
        "one item of %s/%s failed once and then passed (%r): an intermittent fault",
        loaded.model, loaded.version, cause,
    )  # fmt: skip
    return outcome_of(result)


def probe_engine(loaded: LoadedVersion, cause: BaseException) -> None:
    """Run a blank image; if the engine fails on that every time, the fault is the engine's.

    Raises:
        EngineFailure: the engine failed on every probe (sticky for a device fault).
    """
    cfg = loaded.config.input
    blank = np.zeros((cfg.height, cfg.width, cfg.channels), dtype=np.uint8)
    geometry = ImageGeometry(cfg.height, cfg.width, cfg.height, cfg.width, 1.0, 1.0)
    failures: list[BaseException] = []
    for _ in range(PROBE_ATTEMPTS):
        try:
            _infer(loaded, [BatchItem(blank, geometry, loaded.version)])
        except EngineFault as err:
            raise device_lost(loaded, err) from err
        except Exception as err:  # noqa: BLE001 - counted; only repeated failures blame the engine
            failures.append(err)
            continue
        if failures:
            logger.warning("blank probe of %s/%s failed once, then passed: %r", loaded.model, loaded.version, failures)
        return
    raise EngineFailure(
        f"engine {loaded.engine.backend_name} for {loaded.model}/{loaded.version} fails on a "
        f"blank image too ({failures[-1]!r}, {len(failures)} times; first failure {cause!r})"
    ) from cause


def retry_outcome(loaded: LoadedVersion, item: AnyItem, started: float, message: str) -> ItemOutcome:
    """``item`` is to be retried (a fault that is not its own); nothing is recorded."""
    return ItemOutcome(
        version=loaded.version,
        backend=loaded.engine.backend_name,
        engine_source=loaded.engine_source,
        queue_wait_ms=round((started - item.enqueued_at) * 1000, 3),
        batch_size=1,
        retry_message=message,
    )


def failed_outcome(loaded: LoadedVersion, item: AnyItem, started: float, message: str) -> ItemOutcome:
    """``item`` failed alone on a healthy engine: recorded as ``inference_failed``."""
    return ItemOutcome(
        version=loaded.version,
        backend=loaded.engine.backend_name,
        engine_source=loaded.engine_source,
        queue_wait_ms=round((started - item.enqueued_at) * 1000, 3),
        batch_size=1,
        error_reason=ErrorReason.INFERENCE_FAILED,
        error_message=message,
    )
