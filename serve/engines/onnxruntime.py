"""ONNX Runtime backend: the CUDA execution provider when ``onnxruntime-gpu`` is
installed and a GPU is visible, the CPU otherwise.

The provider that actually runs is read back from the session, so a silent
fallback to CPU shows up in every result's ``backend`` field
(``onnxruntime:CUDAExecutionProvider`` / ``onnxruntime:CPUExecutionProvider``).
ONNX Runtime's own TensorRT execution provider is used only when asked for by
name: it needs TensorRT's libraries, and triggerfish has its own TensorRT backend.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence

import numpy as np

from serve.engines.base import EngineFault, EngineSpec
from shared.errors import ConfigError

logger = logging.getLogger(__name__)

# How ONNX Runtime's CUDA provider reports errors that corrupt the CUDA context
# ("CUDA failure 700: an illegal memory access was encountered", ...).
_STICKY_CUDA = re.compile(
    r"CUDA failure (?:700|702|710|714|715|716|717|718|719|214|999)\b|illegal memory access|"
    r"unspecified launch failure|cudaErrorIllegalAddress|cudaErrorLaunchFailure",
    re.IGNORECASE,
)

# Preference order when the caller does not name providers.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def provider_list(providers: Sequence[str], device: int) -> list[object]:
    """ONNX Runtime's ``providers`` argument: CUDA on GPU ``device``, the others as named.

    cuDNN's convolution algorithm search is heuristic rather than exhaustive: batches are
    not padded on this backend, and an exhaustive search would run on the request path for
    every batch size not seen before.
    """
    cuda = {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC"}
    return [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]


def session_options(intra_op_threads: int | None = None):  # noqa: ANN201 - ort.SessionOptions
    """Session options shared by every ONNX Runtime session triggerfish creates.

    Intra-op threads do not spin while waiting for work: in a serving process the
    cores they would burn are the ones decoding the next images.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = intra_op_threads or int(os.environ.get("TRIGGERFISH_ORT_THREADS", "0") or 0)
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxRuntimeEngine:
    """An ``onnxruntime.InferenceSession`` behind the :class:`~serve.engines.base.Engine` protocol.

    ``InferenceSession.run`` is thread-safe, so one session serves every worker.
    """

    def __init__(self, spec: EngineSpec, session: object, provider: str) -> None:
        self._spec = spec
        self._session = session
        self._provider = provider
        self._fault: str | None = None

    @classmethod
    def load(
        cls,
        spec: EngineSpec,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        device: int = 0,
    ) -> OnnxRuntimeEngine:
        """Create the session; ``providers`` defaults to the best available ones, CUDA on
        GPU ``device``."""
        import onnxruntime as ort

        available = ort.get_available_providers()
        wanted = (
            list(providers) if providers else [p for p in PREFERRED_PROVIDERS if p in available]
        )
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ConfigError(
                f"ONNX Runtime providers {missing} are not available (have {available}); "
                "install onnxruntime-gpu for CUDA/TensorRT providers"
            )
        options = session_options(intra_op_threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(spec.onnx_path),
            options,
            providers=provider_list(wanted, device),
        )
        names = {i.name for i in session.get_inputs()}
        if spec.input_name not in names:
            raise ConfigError(
                f"model {spec.model}/{spec.version} has no input {spec.input_name!r} (has {sorted(names)})"
            )
        outputs = {o.name for o in session.get_outputs()}
        unknown = [n for n in spec.output_names if n not in outputs]
        if unknown:
            raise ConfigError(
                f"model {spec.model}/{spec.version} has no outputs {unknown} (has {sorted(outputs)})"
            )
        provider = session.get_providers()[0]
        if wanted and provider != wanted[0]:
            logger.warning("ONNX Runtime fell back from %s to %s", wanted[0], provider)
        return cls(spec, session, provider)

    @property
    def backend_name(self) -> str:
        return f"onnxruntime:{self._provider}"

    @property
    def healthy(self) -> bool:
        """False once the CUDA provider hit a sticky CUDA error (the replica must go)."""
        return self._fault is None

    def check(self) -> bool:
        """Health check for the model server: same as :attr:`healthy`."""
        return self.healthy

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run one batch.

        Raises:
            EngineFault: the CUDA provider reported a sticky CUDA error, now or before.
        """
        if self._fault is not None:
            raise EngineFault(f"{self.backend_name} engine is broken: {self._fault}")
        names = list(self._spec.output_names) or None
        try:
            values = self._session.run(names, {self._spec.input_name: batch})  # type: ignore[attr-defined]
        except Exception as err:
            if self._provider == "CUDAExecutionProvider" and _STICKY_CUDA.search(str(err)):
                self._fault = str(err).strip().splitlines()[0][:300]
                logger.critical(
                    "sticky CUDA error in %s/%s: %s; the replica must be replaced",
                    self._spec.model, self._spec.version, self._fault,
                )  # fmt: skip
                raise EngineFault(f"{self.backend_name}: {self._fault}") from err
            raise
        if names is None:
            names = [o.name for o in self._session.get_outputs()]  # type: ignore[attr-defined]
        return dict(zip(names, values, strict=True))

    def close(self) -> None:
        self._session = None
