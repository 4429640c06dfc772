"""The TensorRT backend against the fake TensorRT/CUDA (which really computes with ORT)."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from serve.engines.cache import (
    DiskEngineStore,
    EngineBuildError,
    EngineCache,
    IncompatibleEngineError,
)
from serve.engines.tensorrt import (
    TensorRTEngine,
    TensorRTError,
    TensorRTUnavailableError,
    build_serialized_engine,
    device_identity,
    engine_cache_key,
)
from serve.model_config import Backend, Precision
from shared.errors import ConfigError
from tests.fakes import FakeGpuHandle, hide_gpu_libraries, install_fake_gpu
from tests.unit.serve.engines.onnx_models import classifier_onnx, images, make_spec, ort_logits


def _engine(spec, precision=Precision.FP32, **build_kwargs) -> TensorRTEngine:
    onnx_bytes = Path(spec.onnx_path).read_bytes()
    spec = replace(spec, precision=precision)
    plan = build_serialized_engine(spec, onnx_bytes, precision=precision, **build_kwargs)
    return TensorRTEngine.from_serialized(spec, plan)


def test_package_imports_without_gpu_libraries() -> None:
    code = (
        "import sys, serve.engines.tensorrt, serve.engines.build, serve.engines.cache;"
        "assert 'tensorrt' not in sys.modules and 'cuda' not in sys.modules, sorted(sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_load_without_tensorrt_fails_with_install_hint(spec, monkeypatch) -> None:
    hide_gpu_libraries(monkeypatch)
    with pytest.raises(TensorRTUnavailableError) as err:
        TensorRTEngine.load(spec)
    assert isinstance(err.value, ConfigError)
    assert "pip install 'triggerfish[gpu]'" in str(err.value)
    assert "nvcr.io/nvidia/tensorrt" in str(err.value)


def test_load_engine_dispatch_reports_missing_tensorrt(spec, monkeypatch) -> None:
    from serve.engines.base import load_engine

    hide_gpu_libraries(monkeypatch)
    with pytest.raises(TensorRTUnavailableError, match="TensorRT is not installed"):
        load_engine(spec, Backend.TENSORRT)


@pytest.mark.parametrize(
    ("version", "message"), [("8.6.1", "8.6.1 is too old"), ("12.0.0.1", "newer than")]
)
def test_tensorrt_outside_the_supported_majors_is_refused(
    spec, monkeypatch, version, message
) -> None:
    install_fake_gpu(monkeypatch, trt_version=version)
    with pytest.raises(TensorRTUnavailableError, match=message):
        TensorRTEngine.load(spec)


def test_device_identity_reads_gpu_and_versions(fake_gpu: FakeGpuHandle) -> None:
    identity = device_identity()
    assert identity.gpu_name == "NVIDIA H100 80GB HBM3"
    assert identity.compute_capability == (9, 0)
    assert identity.sm == "sm_90"
    assert identity.tensorrt_version == "10.3.0.26"
    assert identity.cuda_runtime_version == "12.4"
    assert identity.cuda_driver_version == "12.4"


@pytest.mark.parametrize("layout", ["legacy", "bindings"])
def test_both_cuda_python_layouts_work(spec, monkeypatch, layout) -> None:
    install_fake_gpu(monkeypatch, cuda_layout=layout)
    engine = _engine(spec)
    batch = images(4)
    np.testing.assert_allclose(
        engine.infer(batch)["logits"], ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5
    )
    engine.close()


def test_fp32_engine_matches_onnxruntime(spec, fake_gpu) -> None:
    engine = _engine(spec)
    batch = images(8)
    out = engine.infer(batch)
    assert list(out) == ["logits"]
    np.testing.assert_allclose(
        out["logits"], ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5
    )
    assert engine.backend_name == "tensorrt:fp32:sm_90"
    engine.close()


def test_fp16_engine_is_close_and_names_itself(spec, fake_gpu) -> None:
    engine = _engine(spec, Precision.FP16)
    batch = images(4)
    got = engine.infer(batch)["logits"]
    want = ort_logits(classifier_onnx(), batch)
    np.testing.assert_allclose(got, want, atol=2e-2)
    assert not np.array_equal(got, want)  # really went through the FP16 path
    assert engine.backend_name == "tensorrt:fp16:sm_90"
    assert fake_gpu.trt.STATE.builds[-1]["precision"] == "fp16"
    engine.close()


def test_batches_are_padded_to_built_sizes_and_padding_cut(spec, fake_gpu) -> None:
    engine = _engine(spec)
    batch = images(3)
    out = engine.infer(batch)["logits"]
    assert out.shape == (3, 10)
    assert fake_gpu.trt.STATE.executions[-1]["shapes"]["input"] == (4, 3, 8, 8)
    np.testing.assert_allclose(out, ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5)
    engine.close()


def test_batches_above_max_are_split(spec, fake_gpu) -> None:
    engine = _engine(spec)
    batch = images(11)
    out = engine.infer(batch)["logits"]
    assert out.shape == (11, 10)
    shapes = [e["shapes"]["input"][0] for e in fake_gpu.trt.STATE.executions]
    assert shapes == [8, 4]
    np.testing.assert_allclose(out, ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5)
    engine.close()


def test_concurrent_calls_get_their_own_contexts(onnx_path, fake_gpu) -> None:
    engine = _engine(make_spec(onnx_path, workers=3))
    want = {i: ort_logits(classifier_onnx(), images(1 + i % 8, seed=i)) for i in range(24)}
    got: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(24)

    def call(i: int) -> None:
        try:
            start.wait()
            got[i] = engine.infer(images(1 + i % 8, seed=i))["logits"]
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i in range(24):
        np.testing.assert_allclose(got[i], want[i], rtol=1e-5, atol=1e-5)
    # How many of the 3 contexts a run touches depends on scheduling; never more than 3.
    assert 1 <= len({e["context"] for e in fake_gpu.trt.STATE.executions}) <= 3
    engine.close()


def test_close_frees_every_device_resource(spec, fake_gpu) -> None:
    engine = _engine(replace(spec, workers=2))
    engine.infer(images(2))
    assert fake_gpu.live_device_allocations() == 4  # input + output per worker
    engine.close()
    assert fake_gpu.live_device_allocations() == 0
    assert fake_gpu.live_streams() == 0
    assert fake_gpu.cudart.STATE.errors == []
    with pytest.raises(TensorRTError, match="closed"):
        engine.infer(images(1))


def test_bad_input_is_rejected_before_the_gpu(spec, fake_gpu) -> None:
    engine = _engine(spec)
    with pytest.raises(ValueError, match="dtype"):
        engine.infer(images(2).astype(np.float64))
    with pytest.raises(ValueError, match="shape"):
        engine.infer(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="empty"):
        engine.infer(np.zeros((0, 3, 8, 8), np.float32))
    assert fake_gpu.trt.STATE.executions == []
    engine.close()


@pytest.mark.parametrize(
    ("change", "value"), [("version", "10.4.0"), ("gpu", 8)], ids=["other-tensorrt", "other-gpu"]
)
def test_plan_from_other_tensorrt_or_gpu_is_incompatible(spec, fake_gpu, change, value) -> None:
    plan = build_serialized_engine(spec, classifier_onnx(), precision=Precision.FP32)
    if change == "version":
        fake_gpu.set_trt_version(value)
    else:
        fake_gpu.gpu.major = value
    with pytest.raises(IncompatibleEngineError, match="cannot deserialize"):
        TensorRTEngine.from_serialized(spec, plan)


def test_unparseable_onnx_fails_the_build_with_parser_errors(spec, fake_gpu) -> None:
    with pytest.raises(EngineBuildError, match="cannot parse tiny/1 ONNX: .*invalid ONNX"):
        build_serialized_engine(spec, b"not an onnx model", precision=Precision.FP32)


def test_fixed_batch_onnx_cannot_serve_dynamic_batches(tmp_path, fake_gpu) -> None:
    path = tmp_path / "fixed.onnx"
    path.write_bytes(classifier_onnx(batch_dim=1))
    with pytest.raises(ConfigError, match="fixed batch dimension 1"):
        build_serialized_engine(make_spec(path), path.read_bytes(), precision=Precision.FP32)


def test_missing_output_is_a_config_error(onnx_path, fake_gpu) -> None:
    spec = make_spec(onnx_path, output_names=("scores",))
    with pytest.raises(ConfigError, match=r"no outputs \['scores'\]"):
        build_serialized_engine(spec, onnx_path.read_bytes(), precision=Precision.FP32)


def test_fp16_on_gpu_without_fast_fp16_is_refused(spec, fake_gpu) -> None:
    fake_gpu.gpu.fast_fp16 = False
    with pytest.raises(ConfigError, match="no fast FP16"):
        build_serialized_engine(spec, classifier_onnx(), precision=Precision.FP16)
    assert fake_gpu.trt.STATE.builds == []


def test_int8_needs_a_gpu_with_int8_and_calibration_data(spec, fake_gpu) -> None:
    with pytest.raises(ConfigError, match="needs calibration batches"):
        build_serialized_engine(spec, classifier_onnx(), precision=Precision.INT8)
    fake_gpu.gpu.fast_int8 = False
    with pytest.raises(ConfigError, match="no fast INT8"):
        build_serialized_engine(
            spec, classifier_onnx(), precision=Precision.INT8, calibration_batches=[images(4)]
        )


def test_int8_calibrates_once_then_reuses_the_calibration_cache(spec, fake_gpu, tmp_path) -> None:
    cache = tmp_path / "calib" / "tiny.cache"
    batches = [images(5, seed=s) for s in range(3)]  # 15 images, re-batched into 3 x 5
    engine = _engine(
        spec, Precision.INT8, calibration_batches=batches, calibration_cache_path=cache
    )
    assert fake_gpu.trt.STATE.calibration_batches == 3
    assert cache.is_file()
    batch = images(4, seed=9)
    want = ort_logits(classifier_onnx(), batch)
    np.testing.assert_allclose(engine.infer(batch)["logits"], want, atol=0.1)
    assert engine.backend_name == "tensorrt:int8:sm_90"
    engine.close()
    again = _engine(spec, Precision.INT8, calibration_cache_path=cache)
    assert fake_gpu.trt.STATE.calibration_batches == 3  # no new calibration pass
    again.close()
    assert fake_gpu.live_device_allocations() == 0  # calibration buffer freed too


def test_bad_calibration_batch_fails_the_build_loudly(spec, fake_gpu) -> None:
    with pytest.raises(ConfigError, match="calibration batch"):
        build_serialized_engine(
            spec,
            classifier_onnx(),
            precision=Precision.INT8,
            calibration_batches=[images(4), images(4).astype(np.float64)],
        )


def test_timing_cache_is_saved_reused_and_replaced_on_another_gpu(
    spec, fake_gpu, tmp_path, caplog
) -> None:
    path = tmp_path / "timing" / "sm_90.cache"
    build_serialized_engine(
        spec, classifier_onnx(), precision=Precision.FP32, timing_cache_path=path
    )
    assert path.is_file()
    build_serialized_engine(
        spec, classifier_onnx(), precision=Precision.FP32, timing_cache_path=path
    )
    assert fake_gpu.trt.STATE.timing_cache_hits == 1
    fake_gpu.gpu.name = "NVIDIA L4"
    with caplog.at_level(logging.WARNING):
        build_serialized_engine(
            spec, classifier_onnx(), precision=Precision.FP32, timing_cache_path=path
        )
    assert "does not fit this device" in caplog.text
    assert fake_gpu.trt.STATE.timing_cache_hits == 1
    assert b"NVIDIA L4" in path.read_bytes()


def test_load_goes_through_the_cache(spec, fake_gpu, tmp_path) -> None:
    first = TensorRTEngine.load(spec, EngineCache(disk=DiskEngineStore(tmp_path / "engines")))
    assert first.cache_report is not None and first.cache_report.level == "built"
    assert first.cache_report.build_seconds > 0
    first.close()
    second = TensorRTEngine.load(spec, EngineCache(disk=DiskEngineStore(tmp_path / "engines")))
    assert second.cache_report is not None and second.cache_report.level == "disk"
    assert second.cache_report.build_seconds == 0
    assert len(fake_gpu.trt.STATE.builds) == 1
    batch = images(4)
    np.testing.assert_allclose(
        second.infer(batch)["logits"], ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5
    )
    second.close()


def test_new_tensorrt_version_misses_and_a_planted_stale_plan_is_rebuilt(
    spec, fake_gpu, tmp_path
) -> None:
    store = DiskEngineStore(tmp_path / "engines")
    old = TensorRTEngine.load(spec, EngineCache(disk=store))
    old.close()
    old_plan = next((tmp_path / "engines").rglob("*.engine")).read_bytes()
    fake_gpu.set_trt_version("10.4.0")
    digest = hashlib.sha256(classifier_onnx()).hexdigest()
    new_key = engine_cache_key(spec, digest, device_identity())
    store.store(new_key, old_plan, {})  # a stale plan filed under the new key
    engine = TensorRTEngine.load(spec, EngineCache(disk=store))
    report = engine.cache_report
    assert report is not None and report.level == "built"
    assert report.discarded and "backend refused" in report.discarded[0]
    assert len(fake_gpu.trt.STATE.builds) == 2
    engine.close()
