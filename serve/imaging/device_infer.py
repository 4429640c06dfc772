"""A formed batch of encoded images through the device pipeline and the engine: bytes in, labels out.

This is what a model replica with a GPU runs on each batch its queue forms, instead of
stacking Ingress-decoded uint8 images: :class:`~serve.imaging.device_batch.DeviceBatchPreparer`
builds the normalized batch on the GPU, the engine reads it where it is (ONNX Runtime through
IOBinding, :meth:`serve.engines.onnxruntime.OnnxRuntimeEngine.infer_bound`; TensorRT by a
device-to-device copy into its bound input, :meth:`serve.engines.tensorrt.TensorRTEngine.infer_bound`;
an engine without ``infer_bound`` gets one device-to-host copy of the model-sized batch), and
each row is postprocessed as :func:`serve.model.batch.run_batch` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.imaging.device_batch import DeviceBatch, DeviceBatchPreparer
from serve.postprocess.base import ImageGeometry
from shared.errors import PermanentError, TransientError
from shared.results import Detection, Label

__all__ = ["EncodedResult", "infer_encoded", "infer_prepared", "run_engine_on_device"]


@dataclass(frozen=True, slots=True)
class EncodedResult:
    """One input's labels (classifiers) or detections (detectors), and how it was decoded.

    ``decode`` is the value for results' ``decode`` field: the preparer's name
    (``nvimgcodec:cuda:0``) or ``cpu`` for an image the GPU decoder refused.
    """

    labels: list[Label] | None
    detections: list[Detection] | None
    geometry: ImageGeometry
    decode: str


def run_engine_on_device(engine: Any, tensor: Any) -> dict[str, np.ndarray]:
    """The engine's host outputs for a device-resident ``tensor``."""
    bound = getattr(engine, "infer_bound", None)
    if bound is not None:
        return {k: np.asarray(v) for k, v in bound(tensor).items()}
    asnumpy = getattr(tensor, "get", None)  # CuPy: one device-to-host copy
    host = asnumpy() if asnumpy is not None else np.asarray(tensor)
    return {k: np.asarray(v) for k, v in engine.infer(host).items()}


def infer_encoded(
    loaded: Any, preparer: DeviceBatchPreparer, datas: Sequence[bytes]
) -> list[EncodedResult | PermanentError | TransientError]:
    """Decode, preprocess, infer and postprocess ``datas`` for ``loaded``
    (a :class:`serve.model.batch.LoadedVersion`); one entry per input, in order.

    A bad input gets its own error (``not_an_image``, ``image_too_large``, or transient on
    device out-of-memory) and never fails its neighbours.

    Raises:
        EngineFault: from the engine, as :func:`serve.model.batch.run_batch` expects.
        TransientError: the batch buffer cannot be allocated.
    """
    return infer_prepared(loaded, preparer.prepare(datas), preparer.name)


def infer_prepared(
    loaded: Any, batch: DeviceBatch, decode: str
) -> list[EncodedResult | PermanentError | TransientError]:
    """The second stage of :func:`infer_encoded`: engine and postprocessing for a prepared
    ``batch`` (released here), so that preparing the next batch can overlap it
    (:func:`serve.imaging.overlap.overlapped`)."""
    with batch:
        outputs = run_engine_on_device(loaded.engine, batch.tensor) if batch.positions else {}
    return _postprocess(loaded, batch, outputs, decode)


def _postprocess(
    loaded: Any, batch: DeviceBatch, outputs: Mapping[str, np.ndarray], decode: str
) -> list[EncodedResult | PermanentError | TransientError]:
    results: list[EncodedResult | PermanentError | TransientError] = []
    for outcome in batch.outcomes():
        if isinstance(outcome, PermanentError | TransientError):
            results.append(outcome)
            continue
        row, geometry = outcome
        found = loaded.postprocess({k: v[row] for k, v in outputs.items()}, geometry, loaded.labels)
        detector = loaded.config.task.value == "detection"
        where = decode if batch.decoded_on[row] == "gpu" else "cpu"
        results.append(
            EncodedResult(
                labels=None if detector else list(found),
                detections=list(found) if detector else None,
                geometry=geometry,
                decode=where,
            )
        )
    return results
