"""The fake TensorRT/CUDA punish the misuse real ones punish (else the backend tests prove little)."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest

from tests.fakes import FakeGpuHandle, install_fake_gpu
from tests.fakes.fake_cudart import FakeGpu
from tests.unit.serve.engines.onnx_models import (
    classifier_onnx,
    plugin_onnx,
    save_with_external_weights,
)


def _network(trt):  # noqa: ANN001, ANN202
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    assert trt.OnnxParser(network, logger).parse(classifier_onnx())
    config = builder.create_builder_config()
    return logger, builder, network, config


def _built_context(trt, cudart):  # noqa: ANN001, ANN202
    logger, builder, network, config = _network(trt)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    engine = trt.Runtime(logger).deserialize_cuda_engine(bytes(plan))
    return engine, engine.create_execution_context()


def test_dynamic_input_without_profile_does_not_build(fake_gpu: FakeGpuHandle) -> None:
    _, builder, network, config = _network(fake_gpu.trt)
    assert builder.build_serialized_network(network, config) is None
    assert any("no optimization profile" in m for _, m in fake_gpu.trt.STATE.log)


def test_profile_contradicting_the_network_does_not_build(fake_gpu: FakeGpuHandle) -> None:
    trt = fake_gpu.trt
    _, builder, network, config = _network(trt)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 16, 16), (4, 3, 16, 16), (8, 3, 16, 16))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is None
    with pytest.raises(ValueError):
        profile.set_shape("input", (4, 3, 8, 8), (1, 3, 8, 8), (8, 3, 8, 8))


def test_fp16_flag_on_a_gpu_without_fast_fp16_fails(fake_gpu: FakeGpuHandle) -> None:
    trt = fake_gpu.trt
    fake_gpu.gpu.fast_fp16 = False
    _, builder, network, config = _network(trt)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)
    with pytest.raises(trt.FakeMisuseError):
        builder.build_serialized_network(network, config)


def test_int8_without_calibration_profile_does_not_build(fake_gpu: FakeGpuHandle) -> None:
    trt = fake_gpu.trt
    _, builder, network, config = _network(trt)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.INT8)
    assert builder.build_serialized_network(network, config) is None  # no calibrator at all

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self) -> int:
            return 4

        def get_batch(self, names):  # noqa: ANN001, ANN202
            return None

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache) -> None:  # noqa: ANN001
            raise AssertionError("nothing to write")

    config.int8_calibrator = Calibrator()
    assert builder.build_serialized_network(network, config) is None
    assert any("Calibration profile must be set" in m for _, m in trt.STATE.log)


def test_shape_outside_profile_and_missing_state_are_refused(fake_gpu: FakeGpuHandle) -> None:
    trt, cudart = fake_gpu.trt, fake_gpu.cudart
    engine, context = _built_context(trt, cudart)
    assert context.set_input_shape("input", (8, 3, 8, 8)) is False
    assert context.set_input_shape("logits", (4, 10)) is False
    _, stream = cudart.cudaStreamCreate()
    assert context.execute_async_v3(int(stream)) is False  # no input shape yet
    assert context.set_input_shape("input", (4, 3, 8, 8)) is True
    _, ptr = cudart.cudaMalloc(4 * 3 * 8 * 8 * 4)
    assert context.set_tensor_address("input", ptr)
    assert context.execute_async_v3(int(stream)) is False  # output address missing
    _, small = cudart.cudaMalloc(8)
    assert context.set_tensor_address("logits", small)
    assert context.execute_async_v3(int(stream)) is False  # output buffer too small
    assert context.set_tensor_address("logits", 12345) is False  # not device memory
    with pytest.raises(TypeError):
        context.execute_async_v3(stream)  # the cudaStream_t object, not its int handle


def test_copies_are_checked_and_async_work_waits_for_synchronize(fake_gpu: FakeGpuHandle) -> None:
    cudart = fake_gpu.cudart
    kind = cudart.cudaMemcpyKind
    _, ptr = cudart.cudaMalloc(16)
    host = np.arange(8, dtype=np.float32)  # 32 bytes
    (err,) = cudart.cudaMemcpy(ptr, host.ctypes.data, host.nbytes, kind.cudaMemcpyHostToDevice)
    assert err == cudart.cudaError_t.cudaErrorInvalidValue  # larger than the allocation
    (err,) = cudart.cudaMemcpy(host.ctypes.data, ptr, 16, kind.cudaMemcpyHostToDevice)
    assert err == cudart.cudaError_t.cudaErrorInvalidValue  # direction swapped
    _, stream = cudart.cudaStreamCreate()
    assert (
        cudart.cudaMemcpyAsync(ptr, host.ctypes.data, 16, kind.cudaMemcpyHostToDevice, stream)[0]
        == 0
    )
    out = np.zeros(4, dtype=np.float32)
    assert (
        cudart.cudaMemcpyAsync(out.ctypes.data, ptr, 16, kind.cudaMemcpyDeviceToHost, stream)[0]
        == 0
    )
    assert not out.any()  # nothing has run yet
    assert cudart.cudaStreamSynchronize(stream)[0] == 0
    np.testing.assert_array_equal(out, host[:4])
    assert cudart.cudaFree(ptr)[0] == 0
    assert cudart.cudaFree(ptr)[0] == cudart.cudaError_t.cudaErrorInvalidDevicePointer


def test_a_context_reused_while_in_flight_is_caught(fake_gpu: FakeGpuHandle) -> None:
    trt, cudart = fake_gpu.trt, fake_gpu.cudart
    _, context = _built_context(trt, cudart)
    _, stream = cudart.cudaStreamCreate()
    for name, size in (("input", 4 * 192 * 4), ("logits", 4 * 10 * 4)):
        _, ptr = cudart.cudaMalloc(size)
        context.set_tensor_address(name, ptr)
    assert context.set_input_shape("input", (4, 3, 8, 8))
    assert context.execute_async_v3(int(stream))
    with pytest.raises(trt.FakeMisuseError, match="in flight"):
        context.set_input_shape("input", (2, 3, 8, 8))
    cudart.cudaStreamSynchronize(stream)
    assert context.set_input_shape("input", (2, 3, 8, 8))


# --- the API differences between TensorRT 10.x and 11.x -----------------------------------------


def test_tensorrt_11_has_no_implicit_precision_api(monkeypatch) -> None:
    trt = install_fake_gpu(monkeypatch, trt_version="11.1.0.6").trt
    for name in ("IInt8EntropyCalibrator2", "IInt8Calibrator"):
        assert not hasattr(trt, name)
    assert not hasattr(trt.BuilderFlag, "FP16") and not hasattr(trt.BuilderFlag, "INT8")
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    builder = trt.Builder(trt.Logger())
    config = builder.create_builder_config()
    with pytest.raises(AttributeError):
        config.int8_calibrator = object()
    with pytest.raises(AttributeError):
        config.set_calibration_profile(builder.create_optimization_profile())
    assert getattr(builder, "platform_has_fast_fp16", "absent") == "absent"
    assert builder.create_network(0).strongly_typed


def test_tensorrt_10_has_it_and_strongly_typed_networks_refuse_precision_flags(
    fake_gpu: FakeGpuHandle,
) -> None:
    trt = fake_gpu.trt
    assert trt.BuilderFlag.FP16 is not None and hasattr(trt, "IInt8EntropyCalibrator2")
    logger = trt.Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    assert trt.OnnxParser(network, logger).parse(classifier_onnx())
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)
    assert builder.build_serialized_network(network, config) is None
    assert any("not allowed with strongly typed" in m for _, m in trt.STATE.log)


def test_plugin_ops_import_only_after_the_plugin_library_is_initialized(
    fake_gpu: FakeGpuHandle,
) -> None:
    trt = fake_gpu.trt
    logger = trt.Logger()
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(plugin_onnx())
    assert "Plugin not found: EfficientNMS_TRT" in str(parser.get_error(0))
    assert trt.init_libnvinfer_plugins(logger, "")
    network = trt.Builder(logger).create_network(0)
    assert trt.OnnxParser(network, logger).parse(plugin_onnx())


def test_external_weights_load_only_with_the_model_path(fake_gpu: FakeGpuHandle, tmp_path) -> None:
    trt = fake_gpu.trt
    path = save_with_external_weights(classifier_onnx(), tmp_path / "model.onnx")
    logger = trt.Logger()
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert not parser.parse(path.read_bytes())
    assert "external file" in str(parser.get_error(0))
    for parse in ("file", "bytes+path"):
        network = trt.Builder(logger).create_network(0)
        parser = trt.OnnxParser(network, logger)
        ok = (
            parser.parse_from_file(str(path))
            if parse == "file"
            else parser.parse(path.read_bytes(), path=str(path))
        )
        assert ok and b"external" not in network.onnx


# --- devices, faults, pinned memory and graphs -----------------------------------------------------


def test_the_current_device_is_per_thread_and_builds_follow_it(monkeypatch) -> None:
    handle = install_fake_gpu(
        monkeypatch, gpus=[FakeGpu(), FakeGpu(name="NVIDIA L4", major=8, minor=9)]
    )
    trt, cudart = handle.trt, handle.cudart
    assert cudart.cudaSetDevice(1)[0] == 0
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(cudart.cudaGetDevice()[1]))
    worker.start()
    worker.join()
    assert seen == [0] and cudart.cudaGetDevice()[1] == 1
    _, builder, network, config = _network(trt)
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 3, 8, 8), (4, 3, 8, 8), (4, 3, 8, 8))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None
    assert trt.STATE.builds[-1]["compute_capability"] == [8, 9]


def test_a_faulting_kernel_makes_the_device_error_sticky(fake_gpu: FakeGpuHandle) -> None:
    trt, cudart = fake_gpu.trt, fake_gpu.cudart
    _, context = _built_context(trt, cudart)
    _, stream = cudart.cudaStreamCreate()
    for name, size in (("input", 4 * 192 * 4), ("logits", 4 * 10 * 4)):
        context.set_tensor_address(name, cudart.cudaMalloc(size)[1])
    context.set_input_shape("input", (4, 3, 8, 8))
    fake_gpu.inject_fault()
    assert context.execute_async_v3(int(stream))
    illegal = cudart.cudaError_t.cudaErrorIllegalAddress
    assert cudart.cudaStreamSynchronize(stream)[0] == illegal
    assert cudart.cudaMalloc(16)[0] == illegal  # every later call fails the same way
    assert cudart.cudaMallocHost(16)[0] == illegal


def test_async_copies_from_pageable_memory_are_counted(fake_gpu: FakeGpuHandle) -> None:
    cudart = fake_gpu.cudart
    h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    _, dev = cudart.cudaMalloc(64)
    _, stream = cudart.cudaStreamCreate()
    pageable = np.zeros(16, np.float32)
    cudart.cudaMemcpyAsync(dev, pageable.ctypes.data, 64, h2d, stream)
    _, pinned = cudart.cudaMallocHost(64)
    cudart.cudaMemcpyAsync(dev, pinned, 64, h2d, stream)
    assert cudart.STATE.pageable_async_copies == 1
    assert cudart.cudaFree(dev)[0] == 0
    assert any("while stream work still uses it" in e for e in cudart.STATE.errors)


def test_captured_work_runs_only_when_the_graph_is_launched(fake_gpu: FakeGpuHandle) -> None:
    cudart = fake_gpu.cudart
    h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
    d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _, dev = cudart.cudaMalloc(16)
    _, stream = cudart.cudaStreamCreate()
    _, src = cudart.cudaMallocHost(16)
    _, dst = cudart.cudaMallocHost(16)
    np.frombuffer((ctypes.c_char * 16).from_address(src), np.float32)[:] = [1, 2, 3, 4]
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    assert cudart.cudaStreamBeginCapture(stream, mode)[0] == 0
    cudart.cudaMemcpyAsync(dev, src, 16, h2d, stream)
    cudart.cudaMemcpyAsync(dst, dev, 16, d2h, stream)
    err, graph = cudart.cudaStreamEndCapture(stream)
    assert err == 0
    cudart.cudaStreamSynchronize(stream)
    out = np.frombuffer((ctypes.c_char * 16).from_address(dst), np.float32)
    assert not out.any()  # captured, not run
    _, exec_ = cudart.cudaGraphInstantiate(graph, 0)
    assert cudart.cudaGraphLaunch(exec_, stream)[0] == 0
    cudart.cudaStreamSynchronize(stream)
    np.testing.assert_array_equal(out, [1, 2, 3, 4])
    fake_gpu.gpu.graphs_supported = False
    assert cudart.cudaStreamBeginCapture(stream, mode)[0] == (
        cudart.cudaError_t.cudaErrorStreamCaptureUnsupported
    )
