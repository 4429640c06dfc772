"""Whether a model replica decodes images on its GPU, decided once per loaded version.

A replica decodes whole batches of JPEG bytes on the device
(:class:`serve.imaging.device_batch.DeviceBatchPreparer`) when all of these hold:

- ``TRIGGERFISH_DECODE`` (:attr:`shared.config.Settings.decode`) is ``auto`` or ``device``;
- the version's engine runs on CUDA (ONNX Runtime's CUDA provider, or TensorRT): an
  engine on the CPU would get every batch copied back from the GPU;
- a GPU is visible to the replica and nvImageCodec and CuPy import
  (:func:`serve.imaging.device_batch.device_decode_unavailable`).

``auto`` falls back to the CPU path (the Ingress decodes, as before) and logs why;
``device`` refuses the version instead (a :class:`~shared.errors.ConfigError`, so the
cause shows in the model's stats); ``cpu`` never looks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from serve.imaging.device_batch import DeviceBatchPreparer, device_decode_unavailable
from serve.model.batch import LoadedVersion
from shared.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["attach_device_decode", "engine_device", "engine_on_cuda"]


def engine_on_cuda(engine: Any) -> bool:
    """The engine runs on a GPU: ONNX Runtime's CUDA provider, or TensorRT."""
    name = str(getattr(engine, "backend_name", ""))
    return name.startswith("tensorrt") or name == "onnxruntime:CUDAExecutionProvider"


def engine_device(engine: Any) -> int:
    """The GPU index the engine runs on (0 when it does not say: Ray shows a replica its GPU as 0)."""
    device = getattr(engine, "device", None)
    if device is None:  # TensorRT: the GPU its identity was read from
        device = getattr(getattr(engine, "identity", None), "device_index", 0)
    return device if isinstance(device, int) else 0


def attach_device_decode(
    loaded: LoadedVersion,
    mode: str,
    max_pixels: int,
    *,
    unavailable: Callable[[int], str | None] = device_decode_unavailable,
    make_preparer: Callable[..., Any] = DeviceBatchPreparer,
) -> None:
    """Give ``loaded`` a GPU batch preparer when ``mode`` and the replica allow (module doc).

    Raises:
        ConfigError: ``mode`` is ``device`` and this replica cannot decode on its GPU.
    """
    if mode == "cpu":
        return
    device = engine_device(loaded.engine)
    why = None if engine_on_cuda(loaded.engine) else f"the engine runs on {loaded.engine.backend_name}, not CUDA"
    why = why or unavailable(device)
    if why is not None:
        if mode == "device":
            raise ConfigError(f"TRIGGERFISH_DECODE=device but {loaded.model}/{loaded.version} cannot decode on the GPU: {why}")
        logger.info("%s/%s decodes on the CPU (at the Ingress): %s", loaded.model, loaded.version, why)
        return
    cfg = loaded.config
    loaded.preparer = make_preparer(
        cfg.input, cfg.preprocess, max_batch=cfg.batching.max_batch_size, max_pixels=max_pixels, device=device
    )
    logger.info("%s/%s decodes batches of bytes on %s", loaded.model, loaded.version, loaded.preparer.name)
