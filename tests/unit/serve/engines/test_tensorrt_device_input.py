"""A batch already on the GPU goes into a TensorRT engine device to device (``infer_bound``):
the same outputs as a host batch, no input copy from the host, padding and parts included."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pytest

from serve.engines.tensorrt import TensorRTEngine, build_serialized_engine
from serve.imaging.device_infer import run_engine_on_device
from serve.model_config import Precision
from tests.fakes import FakeGpuHandle
from tests.unit.serve.engines.onnx_models import classifier_onnx, images, ort_logits


class DeviceArray:
    """A C-contiguous array in the fake GPU's memory, exposed as CuPy exposes its arrays."""

    def __init__(self, cudart: Any, host: np.ndarray) -> None:
        err, self.pointer = cudart.cudaMalloc(host.nbytes)
        assert err == cudart.cudaError_t.cudaSuccess
        cudart.write_device(self.pointer, host.tobytes())
        self.__cuda_array_interface__ = {
            "shape": host.shape, "typestr": host.dtype.str, "data": (self.pointer, False),
            "strides": None, "version": 3,
        }  # fmt: skip


@pytest.fixture
def copies(fake_gpu: FakeGpuHandle, monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every ``cudaMemcpyAsync`` by direction."""
    cudart = fake_gpu.cudart
    seen: Counter[str] = Counter()
    real = cudart.cudaMemcpyAsync

    def counted(dst, src, count, kind, stream):  # noqa: ANN001, ANN202
        seen[cudart.cudaMemcpyKind(kind).name] += 1
        return real(dst, src, count, kind, stream)

    monkeypatch.setattr(cudart, "cudaMemcpyAsync", counted)
    return seen


def _engine(spec) -> TensorRTEngine:  # noqa: ANN001
    plan = build_serialized_engine(spec, precision=Precision.FP32)
    return TensorRTEngine.from_serialized(spec, plan)


@pytest.mark.parametrize("rows", [1, 3, 8, 19], ids=lambda n: f"{n}-rows")
def test_a_device_batch_gives_the_host_batchs_outputs_without_crossing_to_the_host(
    spec, fake_gpu: FakeGpuHandle, copies: Counter[str], rows: int
) -> None:
    engine = _engine(spec)  # built sizes 1, 4, 8: 3 rows are padded to 4, 19 run as 8 + 8 + 3
    batch = images(rows, seed=rows)

    out = engine.infer_bound(DeviceArray(fake_gpu.cudart, batch))["logits"]

    np.testing.assert_allclose(out, ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5)
    assert out.shape[0] == rows  # padding cut off
    assert copies["cudaMemcpyHostToDevice"] == 0
    assert copies["cudaMemcpyDeviceToHost"] == -(-rows // 8)  # the outputs, once per part
    assert fake_gpu.cudart.STATE.errors == []
    engine.close()


def test_device_batches_replay_the_graphs_that_host_batches_captured(spec, fake_gpu) -> None:
    engine = _engine(spec)
    engine.infer(images(4))  # captures the graph at 4
    batch = images(3, seed=5)

    out = engine.infer_bound(DeviceArray(fake_gpu.cudart, batch))["logits"]

    assert engine.graph_runs == 1
    np.testing.assert_allclose(out, ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5)
    engine.close()


def test_a_host_batch_given_to_infer_bound_runs_as_infer(spec, fake_gpu, copies) -> None:
    engine = _engine(spec)
    batch = images(2)

    out = engine.infer_bound(batch)["logits"]

    np.testing.assert_allclose(out, engine.infer(batch)["logits"])
    assert copies["cudaMemcpyDeviceToDevice"] == 0
    engine.close()


def test_a_device_batch_of_the_wrong_shape_or_dtype_or_layout_is_refused(spec, fake_gpu) -> None:
    engine = _engine(spec)
    cudart = fake_gpu.cudart
    with pytest.raises(ValueError, match="dtype float64"):
        engine.infer_bound(DeviceArray(cudart, images(2).astype(np.float64)))
    with pytest.raises(ValueError, match="does not match"):
        engine.infer_bound(DeviceArray(cudart, images(2)[:, :1].copy()))
    strided = DeviceArray(cudart, images(2))
    strided.__cuda_array_interface__["strides"] = (4, 4, 4, 4)
    with pytest.raises(ValueError, match="non-contiguous"):
        engine.infer_bound(strided)
    engine.close()


def test_the_service_path_hands_a_device_batch_to_tensorrt_by_pointer(spec, fake_gpu, copies) -> None:
    engine = _engine(spec)
    batch = images(4)

    out = run_engine_on_device(engine, DeviceArray(fake_gpu.cudart, batch))["logits"]

    np.testing.assert_allclose(out, ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5)
    assert copies["cudaMemcpyHostToDevice"] == 0 and copies["cudaMemcpyDeviceToDevice"] == 1
    engine.close()
