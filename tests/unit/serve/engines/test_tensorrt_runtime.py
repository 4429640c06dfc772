"""Where TensorRT engines build and run, and how they behave under load, faults and close."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from serve.engines.base import EngineFault, engine_healthy
from serve.engines.cache import DiskEngineStore, EngineCache
from serve.engines.tensorrt import (
    TensorRTDeviceFault,
    TensorRTEngine,
    TensorRTError,
    build_serialized_engine,
)
from serve.model_config import Precision
from tests.fakes import FakeGpuHandle, install_fake_gpu
from tests.fakes.fake_cudart import FakeGpu
from tests.unit.serve.engines.onnx_models import classifier_onnx, images, ort_logits

L4 = FakeGpu(name="NVIDIA L4", major=8, minor=9)


def _engine(spec, device: int = 0) -> TensorRTEngine:  # noqa: ANN001
    plan = build_serialized_engine(spec, precision=Precision.FP32, device=device)
    return TensorRTEngine.from_serialized(spec, plan, device=device)


def _close_to_ort(out: np.ndarray, batch: np.ndarray) -> None:
    np.testing.assert_allclose(out, ort_logits(classifier_onnx(), batch), rtol=1e-5, atol=1e-5)


def test_an_engine_for_device_1_is_built_on_device_1(spec, monkeypatch, tmp_path) -> None:
    handle = install_fake_gpu(monkeypatch, gpus=[FakeGpu(), L4])
    cache = EngineCache(disk=DiskEngineStore(tmp_path / "engines"))
    engine = TensorRTEngine.load(spec, cache, device=1)
    build = handle.trt.STATE.builds[-1]
    assert (build["device_index"], build["compute_capability"]) == (1, [8, 9])
    assert engine.cache_report is not None and engine.cache_report.level == "built"
    assert engine.backend_name == "tensorrt:fp32:sm_89"
    batch = images(4)
    _close_to_ort(engine.infer(batch)["logits"], batch)
    engine.close()


def test_calls_from_fresh_threads_run_on_the_engines_device(spec, monkeypatch) -> None:
    cudart = install_fake_gpu(monkeypatch, gpus=[FakeGpu(), L4]).cudart
    engine = _engine(spec, device=1)
    seen: list[int] = []

    def call() -> None:  # a new host thread starts on device 0
        engine.infer(images(1))
        seen.append(cudart.current_device())

    worker = threading.Thread(target=call)
    worker.start()
    worker.join()
    assert seen == [1]
    engine.close()


def test_host_buffers_are_pinned_and_freed(spec, fake_gpu: FakeGpuHandle) -> None:
    engine = _engine(replace(spec, workers=2))
    batch = images(8)
    _close_to_ort(engine.infer(batch)["logits"], batch)
    cudart = fake_gpu.cudart
    assert cudart.STATE.pageable_async_copies == 0
    assert len(cudart.STATE.host_allocations) == 4  # input + output per worker
    engine.close()
    assert len(cudart.STATE.host_allocations) == 0
    assert fake_gpu.live_device_allocations() == 0
    assert cudart.STATE.errors == []


def test_each_built_batch_size_is_replayed_from_a_cuda_graph(spec, fake_gpu) -> None:
    engine = _engine(spec)
    for size in (4, 4, 1, 8, 1, 3):
        batch = images(size, seed=size)
        _close_to_ort(engine.infer(batch)["logits"], batch)
    # The first call at a size runs plainly and captures; later calls at that size replay:
    # the second 4, the second 1 and the 3 (padded to 4).
    assert engine.graph_runs == 3
    assert fake_gpu.cudart.STATE.graph_launches == 3
    engine.close()
    assert fake_gpu.cudart.STATE.graph_execs == {}


@pytest.mark.parametrize("why", ["engine", "gpu"])
def test_capture_failures_fall_back_to_plain_enqueues(spec, fake_gpu, caplog, why) -> None:
    if why == "engine":
        fake_gpu.trt.STATE.capture_unsupported = True
    else:
        fake_gpu.gpu.graphs_supported = False
    engine = _engine(spec)
    with caplog.at_level("INFO", logger="serve.engines.tensorrt"):
        for _ in range(3):
            batch = images(4)
            _close_to_ort(engine.infer(batch)["logits"], batch)
    assert engine.graph_runs == 0
    assert caplog.text.count("CUDA graphs unavailable") == 1
    engine.close()


def test_a_sticky_fault_breaks_the_engine_and_is_an_engine_fault(spec, fake_gpu) -> None:
    engine = _engine(replace(spec, workers=2))
    engine.infer(images(4))
    fake_gpu.inject_fault()
    with pytest.raises(TensorRTDeviceFault, match="cudaErrorIllegalAddress") as err:
        engine.infer(images(4))
    assert isinstance(err.value, EngineFault)
    assert not engine.healthy and not engine.check() and not engine_healthy(engine)
    runs = len(fake_gpu.trt.STATE.executions)
    with pytest.raises(EngineFault, match="broken"):
        engine.infer(images(2))  # refused before touching the GPU
    assert len(fake_gpu.trt.STATE.executions) == runs
    engine.close()  # does not raise although every CUDA call now fails
    assert not engine.healthy


def test_a_fault_wakes_callers_waiting_for_a_slot(spec, fake_gpu, monkeypatch) -> None:
    engine = _engine(spec)  # one worker
    cudart = fake_gpu.cudart
    entered, release = threading.Event(), threading.Event()
    real_sync = cudart.cudaStreamSynchronize

    def slow_sync(stream):  # noqa: ANN001, ANN202
        entered.set()
        release.wait(5)
        return real_sync(stream)

    monkeypatch.setattr(cudart, "cudaStreamSynchronize", slow_sync)
    fake_gpu.inject_fault()
    errors: list[BaseException] = []

    def call() -> None:
        try:
            engine.infer(images(4))
        except BaseException as err:  # collected and asserted below
            errors.append(err)

    first = threading.Thread(target=call)
    first.start()
    entered.wait(5)
    waiter = threading.Thread(target=call)
    waiter.start()
    time.sleep(0.05)
    release.set()
    first.join(5)
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(errors) == 2 and all(isinstance(e, EngineFault) for e in errors)


def test_close_wakes_waiters_and_never_frees_a_call_in_flight(spec, fake_gpu, monkeypatch) -> None:
    engine = _engine(spec)  # one worker: a second caller waits for the slot
    cudart = fake_gpu.cudart
    entered, release = threading.Event(), threading.Event()
    real_sync = cudart.cudaStreamSynchronize

    def slow_sync(stream):  # noqa: ANN001, ANN202
        entered.set()
        release.wait(5)
        return real_sync(stream)

    monkeypatch.setattr(cudart, "cudaStreamSynchronize", slow_sync)
    results: dict[str, object] = {}

    def call(name: str, batch: np.ndarray) -> None:
        try:
            results[name] = engine.infer(batch)["logits"]
        except BaseException as err:  # collected and asserted below
            results[name] = err

    batch = images(4)
    in_flight = threading.Thread(target=call, args=("in_flight", batch))
    in_flight.start()
    assert entered.wait(5)
    waiter = threading.Thread(target=call, args=("waiter", images(1)))
    waiter.start()
    time.sleep(0.05)
    engine._pool.close(timeout_s=0.1)  # noqa: SLF001 - the pool's bounded wait, shortened
    waiter.join(2)
    assert not waiter.is_alive(), "close() left a waiter hanging"
    assert isinstance(results["waiter"], TensorRTError)
    assert fake_gpu.live_device_allocations() == 2  # the busy slot's buffers are still there
    release.set()
    in_flight.join(5)
    _close_to_ort(results["in_flight"], batch)  # type: ignore[arg-type]
    assert fake_gpu.live_device_allocations() == 0  # freed by the call on its way out
    assert not any("while stream work" in e for e in cudart.STATE.errors)
    engine.close()
