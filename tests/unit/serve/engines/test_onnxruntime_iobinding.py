"""Device-resident engine input: IOBinding on ONNX Runtime, and the CUDA arena limit."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from serve.engines.base import EngineFault
from serve.engines.onnxruntime import OnnxRuntimeEngine, provider_list
from shared.errors import ConfigError
from tests.fakes import fake_cupy
from tests.fakes.fake_ort_iobinding import FakeCudaSession
from tests.unit.serve.engines.onnx_models import images


class DeviceArray:
    """What a CuPy array offers ONNX Runtime: only ``__cuda_array_interface__``."""

    def __init__(self, host: np.ndarray) -> None:
        self.host = host

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": self.host.shape,
            "typestr": self.host.dtype.str,
            "data": (self.host.ctypes.data, False),
            "strides": None if self.host.flags.c_contiguous else self.host.strides,
            "version": 3,
        }


def test_bound_host_batches_give_what_session_run_gives_on_the_cpu(spec) -> None:
    engine = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    batch = images(5)
    bound = engine.infer_bound(batch)
    assert list(bound) == ["logits"]
    np.testing.assert_allclose(bound["logits"], engine.infer(batch)["logits"], rtol=1e-6)


def test_bad_batches_are_refused_before_binding(spec) -> None:
    engine = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    with pytest.raises(ValueError, match="non-contiguous"):
        engine.infer_bound(images(4)[:, :, :, ::2])
    with pytest.raises(ValueError, match="is float32, got a float64 batch"):
        engine.infer_bound(images(2).astype(np.float64))
    with pytest.raises(ValueError, match="cannot bind a list"):
        engine.infer_bound([1.0])


def test_a_device_batch_is_bound_by_pointer_on_the_engines_gpu_and_outputs_come_back_once(
    spec,
) -> None:
    session = FakeCudaSession()
    engine = OnnxRuntimeEngine(spec, session, "CUDAExecutionProvider", device=1)
    host = images(3)
    device = DeviceArray(host)
    out = engine.infer_bound(device)
    (binding,) = session.bindings
    device_type, device_id, element_type, shape, ptr = binding.inputs["input"]
    assert (device_type, device_id, element_type, shape) == ("cuda", 1, np.float32, [3, 3, 8, 8])
    assert ptr == host.ctypes.data  # no copy: the buffer itself
    assert binding.outputs == {"logits": "cpu"}
    np.testing.assert_allclose(out["logits"][:, 0], host.reshape(3, -1).sum(axis=1), rtol=1e-5)


def test_a_view_of_the_preparers_buffer_binds_as_is(spec) -> None:
    # DeviceBatch.tensor is buf[:rows] of a CuPy buffer: contiguous, bound at the buffer's start.
    session = FakeCudaSession()
    engine = OnnxRuntimeEngine(spec, session, "CUDAExecutionProvider")
    buffer = fake_cupy.zeros((8, 3, 8, 8), dtype=np.float32)
    buffer[:2] = images(2)
    engine.infer_bound(DeviceArray(buffer[:2]))
    assert session.bindings[0].inputs["input"][3] == [2, 3, 8, 8]
    with pytest.raises(ValueError, match="non-contiguous"):
        engine.infer_bound(DeviceArray(buffer[:, :, ::2]))


def test_a_sticky_cuda_error_in_a_bound_run_breaks_the_engine(spec) -> None:
    session = FakeCudaSession()
    engine = OnnxRuntimeEngine(spec, session, "CUDAExecutionProvider")
    session.fail_with = "CUDA failure 700: an illegal memory access was encountered"
    with pytest.raises(EngineFault, match="illegal memory access"):
        engine.infer_bound(DeviceArray(images(1)))
    assert not engine.healthy
    with pytest.raises(EngineFault, match="is broken"):
        engine.infer_bound(DeviceArray(images(1)))


def test_other_errors_in_a_bound_run_are_raised_as_they_are(spec) -> None:
    session = FakeCudaSession()
    engine = OnnxRuntimeEngine(spec, session, "CUDAExecutionProvider")
    session.fail_with = "Invalid input shape"
    with pytest.raises(RuntimeError, match="Invalid input shape"):
        engine.infer_bound(DeviceArray(images(1)))
    assert engine.healthy


def test_the_cuda_arena_is_capped_per_model() -> None:
    providers = provider_list(
        ["CUDAExecutionProvider", "CPUExecutionProvider"], 0, gpu_mem_limit=2 << 30
    )
    assert providers[0] == (
        "CUDAExecutionProvider",
        {
            "device_id": 0,
            "cudnn_conv_algo_search": "HEURISTIC",
            "gpu_mem_limit": 2 << 30,
            "arena_extend_strategy": "kSameAsRequested",
        },
    )
    with pytest.raises(
        ConfigError, match="gpu_mem_limit must be a positive number of bytes, got 0"
    ):
        provider_list(["CUDAExecutionProvider"], 0, gpu_mem_limit=0)


def test_load_passes_the_limit_to_the_session(spec, monkeypatch) -> None:
    seen: list[object] = []
    real = ort.InferenceSession

    def session(path, options, providers):  # noqa: ANN001, ANN202
        seen.append(providers)
        return real(path, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", session)
    OnnxRuntimeEngine.load(spec, gpu_mem_limit=1 << 30, device=0)
    assert seen[0][0][1]["gpu_mem_limit"] == 1 << 30
