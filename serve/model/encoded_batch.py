"""Running one dynamic batch of encoded images on a replica that decodes on its GPU.

The counterpart of :func:`serve.model.batch.run_batch` for :class:`EncodedItem` s:
the batch the queue formed is decoded, resized and normalized on the device
(:class:`serve.imaging.device_batch.DeviceBatchPreparer`) and goes to the engine
without leaving the GPU (:func:`serve.imaging.device_infer.infer_prepared`). A batch
larger than the preparer's slots (the queue's batch size was raised at runtime) runs
as several, preparing the next while the engine runs the previous
(:func:`serve.imaging.overlap.overlapped`).

Error semantics are the CPU path's:

- an input the decoders refuse (``not_an_image``, ``image_too_large``) gets its own
  error result and never fails its neighbours;
- device out of memory (decoding one image, or the batch buffer) is transient: the
  items are retried later, nothing is recorded;
- an engine failure is isolated as :func:`serve.model.batch.run_batch` does: each item
  alone, a blank probe before the engine or the item is blamed, and
  :class:`~serve.model.batch.EngineFailure` when the engine fails on a blank image too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from serve.engines.base import EngineFault
from serve.imaging.device_infer import EncodedResult, infer_prepared
from serve.imaging.overlap import overlapped
from serve.model.batch import (
    EncodedItem,
    ItemOutcome,
    LoadedVersion,
    device_lost,
    isolate,
    retry_outcome,
    retry_reason,
)
from shared.errors import PermanentError, TransientError

logger = logging.getLogger(__name__)

__all__ = ["run_encoded_batch"]

_Results = list[EncodedResult | PermanentError | TransientError]


def run_encoded_batch(
    loaded: LoadedVersion, items: Sequence[EncodedItem], clock: Callable[[], float] = time.monotonic
) -> list[ItemOutcome]:
    """Decode, infer and postprocess ``items`` (all of ``loaded``'s version, which has a
    preparer); one outcome per item, in order.

    Raises:
        EngineFailure: the engine fails on a known-good input too.
    """
    preparer = loaded.preparer
    if preparer is None:
        raise ValueError(f"{loaded.model}/{loaded.version} does not decode on the device")
    started = clock()
    size = preparer.max_batch
    chunks = [list(items[i : i + size]) for i in range(0, len(items), size)]

    def prepare(chunk: list[EncodedItem]) -> tuple[Any, float]:
        t = clock()
        batch = preparer.prepare([item.data for item in chunk])
        return batch, (clock() - t) * 1000

    def consume(prepared: tuple[Any, float]) -> tuple[_Results, float, float]:
        batch, decode_ms = prepared
        t = clock()
        return infer_prepared(loaded, batch, preparer.name), decode_ms, (clock() - t) * 1000

    try:
        # A batch prepared ahead of one that fails gives its buffer slot back.
        done = list(overlapped(chunks, prepare, consume, lambda prepared: prepared[0].release()))
    except EngineFault as err:
        raise device_lost(loaded, err) from err
    except Exception as err:  # noqa: BLE001 - isolate the failing item(s) below
        if (reason := retry_reason(err, preparer.name)) is not None:
            # The batch buffer or the engine ran out of device memory (or failed transiently):
            # nobody's input is to blame.
            logger.warning("a batch of %d of %s/%s: %s", len(items), loaded.model, loaded.version, reason)
            return [retry_outcome(loaded, item, started, reason) for item in items]
        if len(items) == 1:
            item = items[0]
            return [
                isolate(
                    loaded, item, err, started, preparer.name,
                    run_alone=lambda: infer_prepared(loaded, preparer.prepare([item.data]), preparer.name),
                    outcome_of=lambda results: _outcome(
                        loaded, item, results[0], started, 1, 0.0, (clock() - started) * 1000
                    ),
                )  # fmt: skip
            ]
        logger.warning("encoded batch of %d failed; retrying items one by one", len(items), exc_info=True)
        return [outcome for item in items for outcome in run_encoded_batch(loaded, [item], clock)]
    outcomes = []
    for chunk, (results, decode_ms, inference_ms) in zip(chunks, done, strict=True):
        outcomes += [
            _outcome(loaded, item, result, started, len(chunk), decode_ms, inference_ms)
            for item, result in zip(chunk, results, strict=True)
        ]
    return outcomes


def _outcome(
    loaded: LoadedVersion, item: EncodedItem, result: EncodedResult | PermanentError | TransientError,
    started: float, batch_size: int, decode_ms: float, inference_ms: float,
) -> ItemOutcome:  # fmt: skip
    if isinstance(result, TransientError):
        return retry_outcome(loaded, item, started, str(result))
    common = {
        "version": loaded.version,
        "backend": loaded.engine.backend_name,
        "engine_source": loaded.engine_source,
        "queue_wait_ms": round((started - item.enqueued_at) * 1000, 3),
        "batch_size": batch_size,
    }
    if isinstance(result, PermanentError):
        return ItemOutcome(**common, error_reason=result.reason, error_message=result.message)
    return ItemOutcome(
        **common,
        labels=result.labels,
        detections=result.detections,
        inference_ms=round(inference_ms, 3),
        decode=result.decode,
        decode_ms=round(decode_ms, 3),
    )
