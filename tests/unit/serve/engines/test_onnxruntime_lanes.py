"""ONNX Runtime on the CPU: a batch runs as chunks on parallel single-threaded lanes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serve.engines.onnxruntime import CpuParallelism, OnnxRuntimeEngine, cpu_parallelism
from shared.errors import ConfigError
from tests.unit.serve.engines.onnx_models import images, ort_logits


class _RecordingSession:
    """Doubles its input; records each run's size and thread."""

    def __init__(self) -> None:
        self.runs: list[tuple[int, str]] = []
        self._lock = threading.Lock()

    def run(self, names, feeds):  # noqa: ANN001, ANN202
        [batch] = feeds.values()
        with self._lock:
            self.runs.append((len(batch), threading.current_thread().name))
        return [batch * 2]


def _engine(spec, session, lanes: int, chunk: int) -> OnnxRuntimeEngine:  # noqa: ANN001
    return OnnxRuntimeEngine(spec, session, "CPUExecutionProvider", CpuParallelism(1, lanes, chunk))


@pytest.mark.parametrize(
    ("size", "lanes", "chunk", "runs"),
    [(16, 2, 2, [2] * 8), (5, 2, 2, [2, 2, 1]), (2, 2, 2, [1, 1]), (1, 2, 2, [1]), (16, 1, 2, [16])],
    ids=["chunks", "remainder", "small-batch-spread", "single", "one-lane"],
)
def test_a_batch_runs_in_chunks_and_comes_back_in_order(spec, size: int, lanes: int, chunk: int, runs: list[int]) -> None:  # noqa: ANN001
    session = _RecordingSession()
    engine = _engine(spec, session, lanes, chunk)
    batch = images(size)

    [out] = engine.infer(batch).values()

    np.testing.assert_array_equal(out, batch * 2)
    assert sorted(n for n, _ in session.runs) == sorted(runs)
    if lanes > 1 and len(runs) > 1:
        assert all(name.startswith("ort-lane") for _, name in session.runs)
    engine.close()


def test_lanes_give_the_same_logits_as_one_run(onnx_path, spec) -> None:  # noqa: ANN001
    from serve.engines.onnxruntime import OnnxRuntimeEngine as Engine

    engine = Engine.load(spec, ["CPUExecutionProvider"])
    batch = images(7)
    try:
        [logits] = engine.infer(batch).values()
    finally:
        engine.close()
    np.testing.assert_allclose(logits, ort_logits(onnx_path.read_bytes(), batch), rtol=1e-5, atol=1e-6)


def test_the_cpu_provider_gets_single_threaded_lanes_one_per_cpu(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("serve.cpus.replica_cpus", lambda env=None: 3)

    assert cpu_parallelism("CPUExecutionProvider", env={}) == CpuParallelism(1, 3, 2)
    assert cpu_parallelism("CPUExecutionProvider", env={"TRIGGERFISH_ORT_CHUNK": "4"}) == CpuParallelism(1, 3, 4)


def test_asking_for_intra_op_threads_means_one_lane(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("serve.cpus.replica_cpus", lambda env=None: 3)

    assert cpu_parallelism("CPUExecutionProvider", env={"TRIGGERFISH_ORT_THREADS": "2"}) == CpuParallelism(2)
    assert cpu_parallelism("CPUExecutionProvider", intra_op_threads=4, env={}) == CpuParallelism(4)
    assert cpu_parallelism("CUDAExecutionProvider", env={}) == CpuParallelism(None)


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_bad_thread_or_chunk_settings_say_which_and_what(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"TRIGGERFISH_ORT_CHUNK must be a positive integer, got '{raw}'"):
        cpu_parallelism("CPUExecutionProvider", env={"TRIGGERFISH_ORT_CHUNK": raw})
    with pytest.raises(ConfigError, match=f"TRIGGERFISH_ORT_THREADS must be a positive integer, got '{raw}'"):
        cpu_parallelism("CPUExecutionProvider", env={"TRIGGERFISH_ORT_THREADS": raw})


@pytest.mark.parametrize(
    ("provider", "expected"),
    [("CPUExecutionProvider", (16,)), ("CUDAExecutionProvider", (1, 4, 8, 16))],
)
def test_a_cpu_session_warms_up_at_its_largest_batch_only(spec, provider: str, expected: tuple[int, ...]) -> None:  # noqa: ANN001
    engine = OnnxRuntimeEngine(spec, _RecordingSession(), provider)

    assert engine.warm_up_sizes((1, 4, 8, 16)) == expected
    engine.close()


def test_warming_a_real_cpu_session_at_its_largest_batch_serves_every_smaller_one(onnx_path, spec) -> None:  # noqa: ANN001
    from serve.engines.base import warm_up_batch_sizes

    engine = OnnxRuntimeEngine.load(spec, ["CPUExecutionProvider"])
    try:
        [largest] = warm_up_batch_sizes(engine, (1, 3, 5))
        engine.infer(images(largest))
        for size in (1, 3):
            [out] = engine.infer(images(size)).values()
            assert out.shape[0] == size
    finally:
        engine.close()
