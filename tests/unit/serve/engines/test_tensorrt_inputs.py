"""What a TensorRT build reads: plugin ops, external weights and per-model timing caches."""

from __future__ import annotations

import fcntl
import threading
import time
from pathlib import Path

import numpy as np

from serve.engines._onnx_info import inspect_model
from serve.engines._tensorrt_build import save_timing_cache
from serve.engines.cache import DiskEngineStore, EngineCache
from serve.engines.tensorrt import (
    TensorRTEngine,
    build_serialized_engine,
    device_identity,
    engine_cache_key,
    timing_cache_file,
)
from serve.model_config import Precision
from tests.fakes import FakeGpuHandle
from tests.unit.serve.engines.onnx_models import (
    classifier_onnx,
    images,
    make_spec,
    ort_logits,
    plugin_onnx,
    save_with_external_weights,
)


def test_models_with_plugin_ops_build_and_their_plans_load(
    fake_gpu: FakeGpuHandle, tmp_path
) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(plugin_onnx())
    spec = make_spec(path, output_names=("num_detections",))
    plan = build_serialized_engine(spec, precision=Precision.FP32)
    assert fake_gpu.trt.STATE.builds[-1]["plugins"] == ["EfficientNMS_TRT"]
    trt = fake_gpu.trt
    trt.STATE.plugins_initialized = False  # a fresh process: the registry is empty again
    engine = TensorRTEngine.from_serialized(spec, plan)  # registers the plugins itself
    assert engine.backend_name == "tensorrt:fp32:sm_90"
    engine.close()


def test_models_with_external_weights_build_and_key_on_the_weights(fake_gpu, tmp_path) -> None:
    path = save_with_external_weights(classifier_onnx(seed=3), tmp_path / "v1" / "model.onnx")
    spec = make_spec(path)
    cache = EngineCache(disk=DiskEngineStore(tmp_path / "engines"))
    engine = TensorRTEngine.load(spec, cache)
    batch = images(4)
    np.testing.assert_allclose(
        engine.infer(batch)["logits"], ort_logits(classifier_onnx(seed=3), batch), atol=1e-5
    )
    engine.close()
    before = inspect_model(path)
    assert before.external_files == ("model.onnx.data",)
    # New weights, same graph file: the key must change, else the old plan would be served.
    save_with_external_weights(classifier_onnx(seed=4), tmp_path / "v2" / "model.onnx")
    (tmp_path / "v1" / "model.onnx.data").write_bytes(
        (tmp_path / "v2" / "model.onnx.data").read_bytes()
    )
    after = inspect_model(path)
    assert path.read_bytes() == (tmp_path / "v2" / "model.onnx").read_bytes()
    assert after.digest != before.digest
    identity = device_identity()
    assert engine_cache_key(spec, after.digest, identity) != engine_cache_key(
        spec, before.digest, identity
    )


def test_timing_caches_are_per_model_gpu_and_tensorrt(fake_gpu, tmp_path) -> None:
    first = tmp_path / "a" / "model.onnx"
    second = tmp_path / "b" / "model.onnx"
    for path, seed in ((first, 0), (second, 1)):
        path.parent.mkdir()
        path.write_bytes(classifier_onnx(seed=seed))
    timing = tmp_path / "timing"
    cache = EngineCache(disk=DiskEngineStore(tmp_path / "engines"))
    for path, name in ((first, "a"), (second, "b")):
        TensorRTEngine.load(make_spec(path, model=name), cache, timing_cache_dir=timing).close()
    files = sorted(p.name for p in timing.glob("*.timing"))
    assert files == [
        "a-1-nvidia-h100-80gb-hbm3-sm_90-trt10.3.0.26.timing",
        "b-1-nvidia-h100-80gb-hbm3-sm_90-trt10.3.0.26.timing",
    ]
    assert timing_cache_file(timing, make_spec(first, model="a"), device_identity()).is_file()


def _config_with_entries(trt, entries: dict[str, str]):  # noqa: ANN001, ANN202
    config = trt.Builder(trt.Logger()).create_builder_config()
    cache = config.create_timing_cache(b"")
    cache.entries.update(entries)
    assert config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def test_saving_merges_timings_another_builder_saved_meanwhile(fake_gpu, tmp_path) -> None:
    trt = fake_gpu.trt
    path = tmp_path / "model.timing"
    save_timing_cache(_config_with_entries(trt, {"theirs": "tactic-1"}), path)
    save_timing_cache(_config_with_entries(trt, {"ours": "tactic-2"}), path)
    merged = (
        trt.Builder(trt.Logger()).create_builder_config().create_timing_cache(path.read_bytes())
    )
    assert merged.entries == {"theirs": "tactic-1", "ours": "tactic-2"}


def test_saving_waits_for_the_file_lock(fake_gpu, tmp_path) -> None:
    path = tmp_path / "model.timing"
    config = _config_with_entries(fake_gpu.trt, {"ours": "tactic-2"})
    with open(tmp_path / "model.timing.lock", "a+b") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # another builder process is saving
        saver = threading.Thread(target=save_timing_cache, args=(config, path))
        saver.start()
        time.sleep(0.2)
        assert not path.exists()
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    saver.join(5)
    assert path.is_file() and not list(tmp_path.glob(".model.timing.*.tmp"))


def test_a_timing_cache_from_another_gpu_is_replaced(fake_gpu, tmp_path, caplog) -> None:
    path = tmp_path / "timing" / "tiny.timing"
    spec = make_spec(Path(tmp_path / "model.onnx"))
    spec.onnx_path.write_bytes(classifier_onnx())
    build_serialized_engine(spec, precision=Precision.FP32, timing_cache_path=path)
    fake_gpu.gpu.name = "NVIDIA L4"
    with caplog.at_level("WARNING"):
        build_serialized_engine(spec, precision=Precision.FP32, timing_cache_path=path)
    assert "does not fit this device" in caplog.text
    assert b"NVIDIA L4" in path.read_bytes()
