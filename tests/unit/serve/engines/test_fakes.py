"""The fake TensorRT/CUDA punish the misuse real ones punish (else the backend tests prove little)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.fakes import FakeGpuHandle
from tests.unit.serve.engines.onnx_models import classifier_onnx


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
