"""build_engine / load_cached_engine for both backends, with the cache and the accuracy guard."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import pytest

from serve.engines._onnxruntime_cache import onnxruntime_cache_key
from serve.engines.accuracy_guard import AccuracyGuard, AccuracyGuardError
from serve.engines.build import (
    BuildReport,
    CalibrationSet,
    ValidationSet,
    build_engine,
    load_cached_engine,
)
from serve.engines.cache import DiskEngineStore, EngineCache, GcsEngineStore
from serve.engines.onnxruntime import OnnxRuntimeEngine
from serve.model_config import Backend, Precision
from shared.results import Label
from tests.unit.serve.engines.onnx_models import classifier_onnx, images, ort_logits


def top1(outputs: Mapping[str, np.ndarray]) -> list[Label]:
    i = int(np.argmax(outputs["logits"]))
    return [Label(class_id=i, label=f"c{i}", score=float(outputs["logits"][i]))]


VALIDATION = ValidationSet([images(16, seed=200 + i) for i in range(3)], top1)


def _cache(tmp_path, name: str = "engines") -> EngineCache:  # noqa: ANN001
    return EngineCache(disk=DiskEngineStore(tmp_path / name))


# --- ONNX Runtime: the optimized model is the cached "engine" ------------------------------------


def test_onnxruntime_build_then_disk_hit(spec, tmp_path) -> None:
    first = build_engine(spec, Backend.ONNXRUNTIME, Precision.FP32, _cache(tmp_path))
    assert first.cache_level == "built" and first.build_seconds > 0 and first.engine_bytes > 0
    assert first.backend_name == "onnxruntime:CPUExecutionProvider"
    folder = tmp_path / "engines" / first.key_digest
    assert (folder / "metadata.json").is_file() and len(list(folder.glob("*.engine"))) == 1
    assert not list((tmp_path / "engines").glob(".ort-optimize-*"))  # scratch removed
    second = build_engine(spec, Backend.ONNXRUNTIME, Precision.FP32, _cache(tmp_path))
    assert second.cache_level == "disk" and second.build_seconds == 0
    assert second.key_digest == first.key_digest
    json.dumps(second.to_dict())  # printable by the CLI


def test_cached_onnxruntime_engine_computes_like_a_plain_session(spec, tmp_path) -> None:
    build_engine(spec, Backend.ONNXRUNTIME, Precision.FP32, _cache(tmp_path))
    result = load_cached_engine(spec, Backend.ONNXRUNTIME, _cache(tmp_path))
    assert result.report.level == "disk"
    plain = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    batch = images(5)
    np.testing.assert_allclose(
        result.value.infer(batch)["logits"], plain.infer(batch)["logits"], rtol=1e-6
    )
    result.value.close()
    plain.close()


def test_onnxruntime_runs_fp32_whatever_the_config_precision(spec, tmp_path) -> None:
    report = build_engine(spec, Backend.ONNXRUNTIME, Precision.FP16, _cache(tmp_path))
    assert report.precision == "fp32" and report.accuracy is None


def test_unloadable_optimized_model_is_discarded_and_rebuilt(spec, tmp_path) -> None:
    store = DiskEngineStore(tmp_path / "engines")
    key = onnxruntime_cache_key(
        spec, hashlib.sha256(classifier_onnx()).hexdigest(), ["CPUExecutionProvider"]
    )
    store.store(key, b"not an onnx model", {})  # intact bytes ONNX Runtime cannot load
    result = load_cached_engine(
        spec, Backend.ONNXRUNTIME, EngineCache(disk=store), providers=["CPUExecutionProvider"]
    )
    assert result.report.level == "built"
    assert "backend refused" in result.report.discarded[0]
    result.value.close()


# --- TensorRT through the fakes -----------------------------------------------------------------


def test_tensorrt_fp16_build_is_guarded_and_verdict_kept(spec, fake_gpu, tmp_path) -> None:
    cache = _cache(tmp_path)
    report = build_engine(spec, Backend.TENSORRT, Precision.FP16, cache, validation=VALIDATION)
    assert report.cache_level == "built" and report.backend_name == "tensorrt:fp16:sm_90"
    assert report.accuracy is not None and report.accuracy["passed"] is True
    assert report.accuracy["images"] == 48
    again = build_engine(spec, Backend.TENSORRT, Precision.FP16, cache, validation=VALIDATION)
    assert again.cache_level == "memory" and again.accuracy == report.accuracy
    assert len(fake_gpu.trt.STATE.builds) == 1
    assert fake_gpu.live_device_allocations() == 0  # build_engine closes what it loaded


def test_tensorrt_int8_refused_by_the_guard_is_never_cached(spec, fake_gpu, tmp_path) -> None:
    bad = CalibrationSet([images(8, seed=3) * 0.001])
    with pytest.raises(AccuracyGuardError, match="tiny/1 at int8"):
        build_engine(
            spec, Backend.TENSORRT, Precision.INT8, _cache(tmp_path), bad, validation=VALIDATION
        )
    assert not list((tmp_path / "engines").rglob("metadata.json"))
    assert fake_gpu.live_device_allocations() == 0


def test_tensorrt_int8_with_good_calibration_passes_a_looser_threshold(
    spec, fake_gpu, tmp_path
) -> None:
    good = CalibrationSet(
        [images(8, seed=s) for s in range(4)], cache_path=tmp_path / "calib.cache"
    )
    with pytest.raises(AccuracyGuardError):  # INT8 rounding flips a few near-ties: not 98 %
        build_engine(
            spec,
            Backend.TENSORRT,
            Precision.INT8,
            _cache(tmp_path),
            good,
            validation=VALIDATION,
            guard=AccuracyGuard(min_agreement=0.98),
        )
    report = build_engine(
        spec,
        Backend.TENSORRT,
        Precision.INT8,
        _cache(tmp_path),
        good,
        validation=VALIDATION,
        guard=AccuracyGuard(min_agreement=0.9),
    )
    assert report.backend_name == "tensorrt:int8:sm_90"
    assert report.accuracy is not None and 0.9 <= report.accuracy["agreement"] < 1.0


def test_reduced_precision_without_validation_set_is_refused_unless_allowed(
    spec, fake_gpu, tmp_path
) -> None:
    with pytest.raises(AccuracyGuardError, match="no validation set"):
        build_engine(spec, Backend.TENSORRT, Precision.FP16, _cache(tmp_path))
    report = build_engine(
        spec, Backend.TENSORRT, Precision.FP16, _cache(tmp_path), allow_unvalidated=True
    )
    assert report.cache_level == "built" and report.accuracy is None
    # The unvalidated entry is checked when a guarded load hits it.
    result = load_cached_engine(
        replace(spec, precision=Precision.FP16),
        Backend.TENSORRT,
        _cache(tmp_path),
        validation=VALIDATION,
    )
    assert result.report.level == "disk" and result.report.info["validation"]["passed"] is True
    result.value.close()


def test_tensorrt_engine_shared_through_gcs(spec, fake_gpu, tmp_path, gcs_bucket) -> None:
    def replica(name: str) -> EngineCache:
        shared = GcsEngineStore(f"gs://{gcs_bucket.name}/trt", client=gcs_bucket.client)
        return EngineCache(disk=DiskEngineStore(tmp_path / name), shared=shared)

    built = build_engine(spec, Backend.TENSORRT, Precision.FP32, replica("a"))
    loaded = build_engine(spec, Backend.TENSORRT, Precision.FP32, replica("b"))
    assert (built.cache_level, loaded.cache_level) == ("built", "gcs")
    assert isinstance(loaded, BuildReport) and loaded.key_digest == built.key_digest
    assert len(fake_gpu.trt.STATE.builds) == 1
    result = load_cached_engine(spec, Backend.TENSORRT, replica("b"))
    assert result.report.level == "disk"
    batch = images(4)
    np.testing.assert_allclose(
        result.value.infer(batch)["logits"],
        ort_logits(classifier_onnx(), batch),
        rtol=1e-5,
        atol=1e-5,
    )
    result.value.close()
