"""ONNX Runtime picks its CUDA execution provider when there is one, and says what ran."""

from __future__ import annotations

import hashlib
import logging
import subprocess

import onnxruntime as ort
import pytest

from serve import gpus
from serve.engines import _onnxruntime_cache
from serve.engines._onnxruntime_cache import (
    choose_providers,
    gpu_identity,
    onnxruntime_cache_key,
)
from serve.engines.build import load_cached_engine
from serve.engines.cache import EngineCache
from serve.engines.onnxruntime import OnnxRuntimeEngine, provider_list
from serve.model_config import Backend
from tests.unit.serve.engines.onnx_models import classifier_onnx, images

GPU_PROVIDERS = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.fixture
def gpu_build(monkeypatch) -> None:
    """onnxruntime-gpu's provider list (this machine has the CPU build)."""
    monkeypatch.setattr(ort, "get_available_providers", lambda: list(GPU_PROVIDERS))


def test_cuda_is_preferred_and_onnx_runtimes_tensorrt_provider_is_not(gpu_build) -> None:
    assert choose_providers(None) == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_the_cuda_provider_gets_its_device_and_a_heuristic_cudnn_search() -> None:
    providers = provider_list(["CUDAExecutionProvider", "CPUExecutionProvider"], device=1)
    assert providers == [
        ("CUDAExecutionProvider", {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}),
        "CPUExecutionProvider",
    ]


def test_a_silent_fallback_to_the_cpu_shows_in_backend(spec, gpu_build, caplog) -> None:
    # The CPU build ignores the CUDA provider: what ran is what the result must name.
    with caplog.at_level(logging.WARNING):
        engine = OnnxRuntimeEngine.load(spec)
    assert engine.backend_name == "onnxruntime:CPUExecutionProvider"
    assert "fell back from CUDAExecutionProvider" in caplog.text


def test_the_cache_key_of_a_cuda_session_names_the_gpu(spec, monkeypatch) -> None:
    monkeypatch.setattr(_onnxruntime_cache, "gpu_identity", lambda device: ("NVIDIA H200", "sm_90"))
    digest = hashlib.sha256(classifier_onnx()).hexdigest()
    cuda = onnxruntime_cache_key(spec, digest, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    cpu = onnxruntime_cache_key(spec, digest, ["CPUExecutionProvider"])
    assert cuda.device_name.startswith("NVIDIA H200 / ") and cuda.compute_capability == "sm_90"
    assert cpu.compute_capability == "" and cuda.digest() != cpu.digest()


def test_gpu_identity_reads_nvidia_smi(monkeypatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    calls: list[list[str]] = []

    def run(cmd, **_):  # noqa: ANN001, ANN003, ANN202
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, stdout="NVIDIA H200, 9.0\n", stderr="")

    monkeypatch.setattr(gpus.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    monkeypatch.setattr(gpus.subprocess, "run", run)
    assert gpu_identity(0) == ("NVIDIA H200", "sm_90")
    assert calls[0][1:3] == ["-i", "3"]  # device 0 of the process is the host's GPU 3


def test_gpu_identity_without_a_driver_is_unknown(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(gpus.shutil, "which", lambda name: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_identity(0)[1] == "unknown"


class _FaultingSession:
    """A CUDA-provider session whose kernels hit an illegal address, as ONNX Runtime says it."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, names, feeds):  # noqa: ANN001, ANN201
        self.calls += 1
        raise RuntimeError(
            "[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: an illegal memory access was "
            "encountered ; GPU=0 ; hostname=node ; expr=cudaStreamSynchronize(stream);"
        )


def test_a_sticky_cuda_error_in_onnx_runtime_is_an_engine_fault(spec) -> None:
    from serve.engines.base import EngineFault

    session = _FaultingSession()
    engine = OnnxRuntimeEngine(spec, session, "CUDAExecutionProvider")
    with pytest.raises(EngineFault, match="CUDA failure 700"):
        engine.infer(images(2))
    assert not engine.healthy and not engine.check()
    with pytest.raises(EngineFault, match="broken"):
        engine.infer(images(2))
    assert session.calls == 1


def test_other_errors_stay_ordinary_errors(spec) -> None:
    class Bad:
        def run(self, names, feeds):  # noqa: ANN001, ANN202
            raise RuntimeError("Got invalid dimensions for input: input")

    engine = OnnxRuntimeEngine(spec, Bad(), "CUDAExecutionProvider")
    with pytest.raises(RuntimeError, match="invalid dimensions"):
        engine.infer(images(2))
    assert engine.healthy


def test_every_session_of_a_cached_cuda_load_gets_the_arena_cap(
    spec, gpu_build, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(_onnxruntime_cache, "gpu_identity", lambda device: ("NVIDIA L4", "sm_89"))
    real = ort.InferenceSession
    seen: list[object] = []

    def session(source, options, providers):  # noqa: ANN001, ANN202
        seen.append(providers)
        return real(source, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", session)
    cache = EngineCache.from_settings(str(tmp_path / "engines"), "")
    limit = 6 << 30
    built = load_cached_engine(spec, Backend.ONNXRUNTIME, cache, gpu_mem_limit=limit)
    built.value.close()
    cached = load_cached_engine(spec, Backend.ONNXRUNTIME, cache, gpu_mem_limit=limit)
    cached.value.close()

    assert built.report.level == "built" and cached.report.level != "built"
    assert len(seen) == 3  # the optimizing session, the built engine's and the cached engine's
    for providers in seen:
        assert providers[0] == (
            "CUDAExecutionProvider",
            {
                "device_id": 0,
                "cudnn_conv_algo_search": "HEURISTIC",
                "gpu_mem_limit": limit,
                "arena_extend_strategy": "kSameAsRequested",
            },
        )
