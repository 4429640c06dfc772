"""ONNX Runtime backend: the CUDA execution provider when ``onnxruntime-gpu`` is
installed and a GPU is visible, the CPU otherwise.

The provider that actually runs is read back from the session, so a silent
fallback to CPU shows up in every result's ``backend`` field
(``onnxruntime:CUDAExecutionProvider`` / ``onnxruntime:CPUExecutionProvider``).
ONNX Runtime's own TensorRT execution provider is used only when asked for by
name: it needs TensorRT's libraries, and triggerfish has its own TensorRT backend.

On the CPU, a batch runs as small chunks on parallel single-threaded *lanes*
(one per CPU the replica has) rather than whole on one session run that splits
each operator across threads: convolution networks like MobileNetV2 keep a
chunk's activations in cache and skip the per-operator thread synchronization.
Measured with MobileNetV2 on a 2-vCPU machine: 461 images/s at 4.25 CPU-ms per
image (2 lanes, chunks of 2) against 353 images/s at 5.1 CPU-ms per image (one
run of 16 on 2 intra-op threads). ``TRIGGERFISH_ORT_THREADS`` selects the other
way (that many intra-op threads, one lane); ``TRIGGERFISH_ORT_CHUNK`` sets the
chunk size.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.engines.base import EngineFault, EngineSpec
from serve.engines.buffers import buffer_of
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
THREADS_ENV = "TRIGGERFISH_ORT_THREADS"
CHUNK_ENV = "TRIGGERFISH_ORT_CHUNK"
# Images per lane run on the CPU: the cheapest per image for MobileNetV2 (1: 4.32,
# 2: 4.25, 4: 4.67, 16: 5.52 CPU-ms per image on one thread).
DEFAULT_CPU_CHUNK = 2


@dataclass(frozen=True, slots=True)
class CpuParallelism:
    """How a session uses the CPUs: intra-op threads per run, runs in parallel, images per run."""

    threads: int | None
    lanes: int = 1
    chunk: int = DEFAULT_CPU_CHUNK


def _positive_env(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ConfigError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def cpu_parallelism(
    provider: str, intra_op_threads: int | None = None, env: Mapping[str, str] | None = None
) -> CpuParallelism:
    """Lanes of single-threaded runs on the CPU provider, unless intra-op threads are asked for.

    Other providers (CUDA) keep ONNX Runtime's defaults and one lane.
    """
    env = os.environ if env is None else env
    threads = intra_op_threads or _positive_env(env, THREADS_ENV)
    if provider != "CPUExecutionProvider" or threads:
        return CpuParallelism(threads)
    from serve.cpus import replica_cpus

    return CpuParallelism(1, replica_cpus(), _positive_env(env, CHUNK_ENV) or DEFAULT_CPU_CHUNK)


def provider_list(
    providers: Sequence[str], device: int, gpu_mem_limit: int | None = None
) -> list[object]:
    """ONNX Runtime's ``providers`` argument: CUDA on GPU ``device``, the others as named.

    cuDNN's convolution algorithm search is heuristic rather than exhaustive: batches are
    not padded on this backend, and an exhaustive search would run on the request path for
    every batch size not seen before.

    ``gpu_mem_limit`` (bytes) caps the CUDA provider's memory arena: two models sharing a
    GPU would otherwise each grow their arena until the other fails. The arena then grows
    by what is asked, not by doubling, so the cap is not reached by one oversized step.
    """
    if gpu_mem_limit is not None and gpu_mem_limit < 1:
        raise ConfigError(f"gpu_mem_limit must be a positive number of bytes, got {gpu_mem_limit}")
    cuda: dict[str, object] = {"device_id": device, "cudnn_conv_algo_search": "HEURISTIC"}
    if gpu_mem_limit is not None:
        cuda["gpu_mem_limit"] = gpu_mem_limit
        cuda["arena_extend_strategy"] = "kSameAsRequested"
    return [(p, cuda) if p == "CUDAExecutionProvider" else p for p in providers]


def session_options(intra_op_threads: int | None = None):  # noqa: ANN201 - ort.SessionOptions
    """Session options shared by every ONNX Runtime session triggerfish creates.

    Intra-op threads do not spin while waiting for work: in a serving process the
    cores they would burn are the ones decoding the next images.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = intra_op_threads or _positive_env(os.environ, THREADS_ENV)
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


class OnnxRuntimeEngine:
    """An ``onnxruntime.InferenceSession`` behind the :class:`~serve.engines.base.Engine` protocol.

    ``InferenceSession.run`` is thread-safe, so one session serves every worker,
    and a batch larger than ``parallelism.chunk`` runs as chunks on
    ``parallelism.lanes`` threads at once.
    """

    def __init__(
        self,
        spec: EngineSpec,
        session: object,
        provider: str,
        parallelism: CpuParallelism | None = None,
        *,
        device: int = 0,
    ) -> None:
        self._spec = spec
        self._device = device
        self._session = session
        self._provider = provider
        self._fault: str | None = None
        self._parallelism = parallelism or CpuParallelism(None)
        self._lanes = (
            ThreadPoolExecutor(self._parallelism.lanes, thread_name_prefix="ort-lane")
            if self._parallelism.lanes > 1
            else None
        )

    @classmethod
    def load(
        cls,
        spec: EngineSpec,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        device: int = 0,
        gpu_mem_limit: int | None = None,
    ) -> OnnxRuntimeEngine:
        """Create the session; ``providers`` defaults to the best available ones, CUDA on
        GPU ``device`` with at most ``gpu_mem_limit`` bytes of arena."""
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
        parallelism = cpu_parallelism(wanted[0] if wanted else "", intra_op_threads)
        options = session_options(parallelism.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(
            str(spec.onnx_path),
            options,
            providers=provider_list(wanted, device, gpu_mem_limit),
        )
        return cls.over_session(spec, session, wanted[0] if wanted else None, parallelism, device)

    @classmethod
    def over_session(
        cls,
        spec: EngineSpec,
        session: Any,
        wanted: str | None,
        parallelism: CpuParallelism,
        device: int = 0,
    ) -> OnnxRuntimeEngine:
        """An engine over an open ``session``, once it has the configured input and outputs.

        ``wanted`` is the provider asked for first; a session that fell back to another is
        logged, and gets no CPU lanes planned for the provider it does not run on.

        Raises:
            ConfigError: the model lacks the configured input or outputs.
        """
        inputs = {i.name for i in session.get_inputs()}
        if spec.input_name not in inputs:
            raise ConfigError(
                f"model {spec.model}/{spec.version} has no input {spec.input_name!r} (has {sorted(inputs)})"
            )
        outputs = {o.name for o in session.get_outputs()}
        unknown = [n for n in spec.output_names if n not in outputs]
        if unknown:
            raise ConfigError(
                f"model {spec.model}/{spec.version} has no outputs {unknown} (has {sorted(outputs)})"
            )
        provider = session.get_providers()[0]
        if wanted and provider != wanted:
            logger.warning("ONNX Runtime fell back from %s to %s", wanted, provider)
        return cls(spec, session, provider, parallelism if provider == wanted else None, device=device)

    @property
    def backend_name(self) -> str:
        return f"onnxruntime:{self._provider}"

    @property
    def device(self) -> int:
        """The GPU index the CUDA provider runs on (0 on the CPU provider)."""
        return self._device

    @property
    def healthy(self) -> bool:
        """False once the CUDA provider hit a sticky CUDA error (the replica must go)."""
        return self._fault is None

    def check(self) -> bool:
        """Health check for the model server: same as :attr:`healthy`."""
        return self.healthy

    def warm_up_sizes(self, sizes: Sequence[int]) -> tuple[int, ...]:
        """On the CPU provider, the largest size alone: its first run sizes the memory arena
        that every smaller batch then reuses, and smaller batches pay no first-run cost of
        their own (MobileNetV2, one thread: 8 images 71.6 ms on their first run after one
        of 16, 70.9 ms on the next; 1 image 8.9 and 8.8 ms). Every size on the others,
        where a new shape selects kernels and allocates device memory."""
        if self._provider == "CPUExecutionProvider" and sizes:
            return (max(sizes),)
        return tuple(sizes)

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run one batch.

        Raises:
            EngineFault: the CUDA provider reported a sticky CUDA error, now or before.
        """
        if self._fault is not None:
            raise EngineFault(f"{self.backend_name} engine is broken: {self._fault}")
        if self._lanes is None or len(batch) == 1:
            return self._run(batch)
        # Small batches are spread over every lane; larger ones go in chunks.
        chunk = min(self._parallelism.chunk, -(-len(batch) // self._parallelism.lanes))
        parts = list(self._lanes.map(self._run, [batch[i : i + chunk] for i in range(0, len(batch), chunk)]))
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}

    def _run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = list(self._spec.output_names) or None
        try:
            values = self._session.run(names, {self._spec.input_name: batch})  # type: ignore[attr-defined]
        except Exception as err:
            raise self._classify(err) from err
        if names is None:
            names = [o.name for o in self._session.get_outputs()]  # type: ignore[attr-defined]
        return dict(zip(names, values, strict=True))

    def _classify(self, err: Exception) -> Exception:
        """``EngineFault`` for a sticky CUDA error (and the engine is marked broken), else ``err``."""
        if self._provider == "CUDAExecutionProvider" and _STICKY_CUDA.search(str(err)):
            self._fault = str(err).strip().splitlines()[0][:300]
            logger.critical(
                "sticky CUDA error in %s/%s: %s; the replica must be replaced",
                self._spec.model, self._spec.version, self._fault,
            )  # fmt: skip
            return EngineFault(f"{self.backend_name}: {self._fault}")
        return err

    def infer_bound(self, batch: Any) -> Mapping[str, np.ndarray]:
        """Run one batch that may already be on the GPU, through ONNX Runtime's IOBinding.

        ``batch`` is a C-contiguous array: one exposing ``__cuda_array_interface__`` (a CuPy
        array on this engine's GPU, e.g. a :class:`serve.imaging.device_batch.DeviceBatch`
        tensor, whose producing stream has been synchronized) is bound by device pointer,
        with no host copy; a NumPy array is bound in host memory. The outputs are bound to
        host memory, so each is copied back once, at the end of the run.

        Raises:
            EngineFault: as :meth:`infer`.
            ValueError: ``batch`` is not contiguous or not of the model's input dtype.
        """
        if self._fault is not None:
            raise EngineFault(f"{self.backend_name} engine is broken: {self._fault}")
        buffer = buffer_of(batch)
        if buffer.dtype != np.dtype(self._spec.input_dtype):
            raise ValueError(
                f"input {self._spec.input_name!r} of {self._spec.model} is "
                f"{self._spec.input_dtype}, got a {buffer.dtype} batch"
            )
        session = self._session
        binding = session.io_binding()  # type: ignore[attr-defined]
        binding.bind_input(
            self._spec.input_name, buffer.device, self._device if buffer.device == "cuda" else 0,
            buffer.dtype.type, list(buffer.shape), buffer.pointer,
        )  # fmt: skip
        names = list(self._spec.output_names) or [o.name for o in session.get_outputs()]  # type: ignore[attr-defined]
        for name in names:
            binding.bind_output(name, "cpu")
        try:
            binding.synchronize_inputs()
            session.run_with_iobinding(binding)  # type: ignore[attr-defined]
        except Exception as err:
            raise self._classify(err) from err
        return dict(zip(names, binding.copy_outputs_to_cpu(), strict=True))

    def close(self) -> None:
        if self._lanes is not None:
            self._lanes.shutdown(wait=True)
        self._session = None
