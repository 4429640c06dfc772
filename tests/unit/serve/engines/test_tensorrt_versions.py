"""TensorRT 10.x and 11.x, explicit quantization, compatibility options and the cache key."""

from __future__ import annotations

import importlib.metadata
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serve.engines import _tensorrt_common
from serve.engines.base import EngineCompatibility, HardwareCompatibility
from serve.engines.cache import DiskEngineStore, EngineCache, IncompatibleEngineError
from serve.engines.tensorrt import (
    TensorRTEngine,
    UnsupportedPrecisionError,
    build_serialized_engine,
    device_identity,
    engine_cache_key,
)
from serve.model_config import Precision
from shared.errors import ConfigError, TriggerfishError
from tests.fakes import install_fake_gpu
from tests.fakes.fake_cudart import FakeGpu
from tests.unit.serve.engines.onnx_models import (
    classifier_onnx,
    images,
    make_spec,
    ort_logits,
    quantized_classifier_onnx,
)

TRT_11 = "11.1.0.6"


@pytest.fixture
def qdq_spec(tmp_path: Path):  # noqa: ANN201
    path = tmp_path / "qdq" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(quantized_classifier_onnx())
    return make_spec(path, precision=Precision.INT8)


def _load(spec, **kwargs) -> TensorRTEngine:  # noqa: ANN001
    plan = build_serialized_engine(spec, precision=spec.precision, **kwargs)
    return TensorRTEngine.from_serialized(spec, plan)


def test_fp32_builds_on_tensorrt_11_as_a_strongly_typed_network(spec, monkeypatch) -> None:
    handle = install_fake_gpu(monkeypatch, trt_version=TRT_11)
    engine = _load(spec)
    batch = images(4)
    np.testing.assert_allclose(
        engine.infer(batch)["logits"], ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5
    )
    assert handle.trt.STATE.builds[-1]["precision"] == "fp32"
    engine.close()


@pytest.mark.parametrize(
    ("precision", "hint"),
    [(Precision.FP16, "export an FP16 ONNX model"), (Precision.INT8, "Q/DQ")],
)
def test_tensorrt_11_refuses_precision_an_fp32_model_cannot_carry(
    spec, monkeypatch, precision, hint
) -> None:
    handle = install_fake_gpu(monkeypatch, trt_version=TRT_11)
    with pytest.raises(UnsupportedPrecisionError, match=hint) as err:
        build_serialized_engine(replace(spec, precision=precision), precision=precision)
    # A typed error under TriggerfishError: the loader falls back to the next backend
    # instead of crashing on TensorRT 11's missing BuilderFlag.FP16 (AttributeError).
    assert isinstance(err.value, ConfigError) and isinstance(err.value, TriggerfishError)
    assert handle.trt.STATE.builds == []


@pytest.mark.parametrize("version", ["10.3.0.26", TRT_11])
def test_explicitly_quantized_models_build_int8_without_calibration(
    qdq_spec, monkeypatch, version
) -> None:
    handle = install_fake_gpu(monkeypatch, trt_version=version)
    engine = _load(qdq_spec)
    build = handle.trt.STATE.builds[-1]
    assert build["precision"] == "int8" and build["explicit_quantization"]
    assert handle.trt.STATE.calibration_batches == 0
    assert engine.backend_name == "tensorrt:int8:sm_90"
    batch = images(4)
    np.testing.assert_allclose(
        engine.infer(batch)["logits"],
        ort_logits(quantized_classifier_onnx(), batch),
        atol=2e-2,  # the fake rounds INT8 engines' activations through float16
    )
    engine.close()


def test_a_quantized_model_configured_as_fp32_is_refused_with_the_fix(qdq_spec, fake_gpu) -> None:
    spec = replace(qdq_spec, precision=Precision.FP32)
    with pytest.raises(UnsupportedPrecisionError, match="typed \\(int8\\)"):
        build_serialized_engine(spec, precision=Precision.FP32)


def test_calibration_stays_available_on_tensorrt_10(spec, fake_gpu) -> None:
    spec = replace(spec, precision=Precision.INT8)
    engine = _load(spec, calibration_batches=[images(4, seed=s) for s in range(2)])
    assert fake_gpu.trt.STATE.calibration_batches == 2
    assert engine.backend_name == "tensorrt:int8:sm_90"
    engine.close()


def test_the_key_has_tensorrts_full_version_and_the_cuda_runtime_it_uses(
    spec, fake_gpu, monkeypatch
) -> None:
    fake_gpu.gpu.runtime_version = 13000  # cuda-python's own bundled runtime
    libcudart = Path("/opt/tensorrt/lib/libcudart.so.12")
    monkeypatch.setattr(_tensorrt_common, "loaded_cuda_runtimes", lambda: [libcudart])
    monkeypatch.setattr(
        _tensorrt_common, "_runtime_version_of", lambda p: 12060 if p == libcudart else None
    )
    identity = device_identity()
    assert identity.cuda_runtime_version == "12.6"
    assert identity.tensorrt_version == "10.3.0.26"
    key = engine_cache_key(spec, "0" * 64, identity)
    assert (key.cuda_version, key.backend_version) == ("12.6", "10.3.0.26")
    fake_gpu.set_trt_version("10.3.0.27")
    assert engine_cache_key(spec, "0" * 64, device_identity()) != key


def test_a_short_version_is_completed_from_the_installed_distribution(monkeypatch) -> None:
    handle = install_fake_gpu(monkeypatch, trt_version="10.3.0")
    versions = {"tensorrt-cu12": "10.3.0.26"}

    def version(name: str) -> str:
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert _tensorrt_common.tensorrt_full_version(handle.trt) == "10.3.0.26"


def test_loaded_cuda_runtimes_are_read_from_the_process_maps(tmp_path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n"
        "7f02-7f03 r-xp 0 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n"
        "7f04-7f05 r--p 0 08:01 2 /venv/nvidia/cuda_runtime/lib/libcudart.so.12\n"
    )
    assert _tensorrt_common.loaded_cuda_runtimes(maps) == [
        Path("/venv/nvidia/cuda_runtime/lib/libcudart.so.12")
    ]


def test_version_compatible_plans_load_on_a_later_release(spec, fake_gpu, tmp_path) -> None:
    compat = replace(spec, compatibility=EngineCompatibility(version_compatible=True))
    plan = build_serialized_engine(compat, precision=Precision.FP32)
    plain = build_serialized_engine(spec, precision=Precision.FP32)
    fake_gpu.set_trt_version("10.4.0.26")
    engine = TensorRTEngine.from_serialized(compat, plan)  # allows the embedded lean runtime
    batch = images(2)
    np.testing.assert_allclose(
        engine.infer(batch)["logits"], ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5
    )
    engine.close()
    with pytest.raises(IncompatibleEngineError):
        TensorRTEngine.from_serialized(spec, plain)
    key = engine_cache_key(compat, "0" * 64, device_identity())
    assert key.backend_version.startswith("10.x (version-compatible")
    assert ("version_compatible", "true") in key.options


def test_hardware_compatible_plans_run_on_other_ampere_plus_gpus(spec, monkeypatch) -> None:
    a100 = FakeGpu(name="NVIDIA A100-SXM4-80GB", major=8, minor=0)
    handle = install_fake_gpu(monkeypatch, gpus=[FakeGpu(), a100])
    compat = replace(
        spec, compatibility=EngineCompatibility(hardware=HardwareCompatibility.AMPERE_PLUS)
    )
    plan = build_serialized_engine(compat, precision=Precision.FP32, device=0)
    assert handle.trt.STATE.builds[-1]["hardware_compatibility"] == "AMPERE_PLUS"
    engine = TensorRTEngine.from_serialized(compat, plan, device=1)
    assert engine.backend_name == "tensorrt:fp32:sm_80"
    engine.close()
    key = engine_cache_key(compat, "0" * 64, device_identity(1))
    assert (key.device_name, key.compute_capability) == (
        "hardware-compatible:ampere_plus",
        "sm_80+",
    )


def test_ampere_plus_cannot_be_built_on_an_older_gpu(spec, monkeypatch) -> None:
    install_fake_gpu(monkeypatch, gpu=FakeGpu(name="Tesla T4", major=7, minor=5))
    compat = replace(
        spec, compatibility=EngineCompatibility(hardware=HardwareCompatibility.AMPERE_PLUS)
    )
    with pytest.raises(ConfigError, match="needs an Ampere or later GPU"):
        build_serialized_engine(compat, precision=Precision.FP32)


def test_quantized_models_skip_the_calibration_digest_in_the_key(
    qdq_spec, fake_gpu, tmp_path
) -> None:
    cache = EngineCache(disk=DiskEngineStore(tmp_path / "engines"))
    engine = TensorRTEngine.load(qdq_spec, cache, calibration_digest="abc")
    report = engine.cache_report
    assert report is not None and report.info["quantization"] == "explicit"
    engine.close()
