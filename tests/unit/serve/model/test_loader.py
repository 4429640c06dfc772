"""Backend choice and fallback when opening an engine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import serve.model.loader as loader
from serve.engines.accuracy_guard import AccuracyGuardError, AccuracyVerdict
from serve.engines.base import EngineSpec
from serve.engines.cache import CacheReport, CacheResult
from serve.model.batch import LoadedVersion
from serve.model.loader import BACKENDS_ENV, backend_preference, engine_spec, open_engine, warm_up
from serve.model.repository import ModelVersion
from serve.model_config import Backend, Precision, parse_model_config
from serve.postprocess.classification import TopKClassifier
from shared.errors import ConfigError, TransientError

BOTH = (Backend.TENSORRT, Backend.ONNXRUNTIME)
SPEC = EngineSpec(
    model="tiny",
    version="2",
    onnx_path=Path("/nowhere/model.onnx"),
    input_name="input",
    input_shape=(3, 4, 4),
    input_dtype="float32",
    output_names=("logits",),
)
CONFIG = parse_model_config(
    {
        "task": "classification",
        "input": {"height": 4, "width": 6, "layout": "NHWC"},
        "postprocess": {"kind": "classification", "output": "logits"},
        "batching": {"max_batch_size": 4, "engine_batch_sizes": [1, 2, 4]},
        "precision": "fp16",
    },
    source="test",
)


class FakeEngine:
    def __init__(self, name: str, outputs: tuple[str, ...] = ("logits",)) -> None:
        self.name = name
        self.shapes: list[tuple[int, ...]] = []
        self._outputs = outputs

    @property
    def backend_name(self) -> str:
        return self.name

    def infer(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        self.shapes.append(batch.shape)
        return {name: np.zeros((batch.shape[0], 10), np.float32) for name in self._outputs}

    def close(self) -> None:
        pass


# --- backend_preference ----------------------------------------------------------------


@pytest.mark.parametrize("env", ["", "  "])
def test_no_setting_keeps_the_config_order(env: str) -> None:
    assert backend_preference(BOTH, env) == [Backend.TENSORRT, Backend.ONNXRUNTIME]
    assert backend_preference(BOTH[::-1], env) == [Backend.ONNXRUNTIME, Backend.TENSORRT]


def test_the_setting_narrows_the_config_order() -> None:
    assert backend_preference(BOTH, "onnxruntime") == [Backend.ONNXRUNTIME]
    assert backend_preference(BOTH, " tensorrt ") == [Backend.TENSORRT]
    assert backend_preference(BOTH, "onnxruntime,tensorrt") == [
        Backend.TENSORRT,
        Backend.ONNXRUNTIME,
    ]
    assert backend_preference((Backend.ONNXRUNTIME,), "tensorrt,onnxruntime") == [
        Backend.ONNXRUNTIME
    ]


def test_the_setting_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKENDS_ENV, "onnxruntime")
    assert backend_preference(BOTH) == [Backend.ONNXRUNTIME]

    monkeypatch.delenv(BACKENDS_ENV)
    assert backend_preference(BOTH) == list(BOTH)


def test_an_unknown_backend_name_names_the_variable_and_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        backend_preference(BOTH, "onnxruntime,openvino")

    message = str(info.value)
    assert "TRIGGERFISH_BACKENDS" in message
    assert "'onnxruntime,openvino'" in message
    assert "['onnxruntime', 'tensorrt']" in message


@pytest.mark.parametrize("env", ["tensorrt", ", ,"])
def test_a_setting_allowing_none_of_the_models_backends_is_refused(env: str) -> None:
    with pytest.raises(ConfigError) as info:
        backend_preference((Backend.ONNXRUNTIME,), env)

    assert f"TRIGGERFISH_BACKENDS={env!r}" in str(info.value)
    assert "allows none of the model's backends" in str(info.value)


# --- open_engine -----------------------------------------------------------------------

CACHE = object()  # passed through to load_cached_engine untouched


def _report() -> CacheReport:
    return CacheReport("built", "digest", 10, "sha", 0.01, 0.5, 0.02)


@pytest.fixture
def mv(tmp_path: Path) -> ModelVersion:
    return ModelVersion("tiny", "2", CONFIG, tmp_path, ())


def test_the_first_backend_that_loads_wins(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path
) -> None:
    calls: list[tuple[Backend, object, dict]] = []

    def load_cached_engine(
        spec: EngineSpec, backend: Backend, cache: object, **kw: object
    ) -> CacheResult:
        calls.append((backend, cache, kw))
        return CacheResult(FakeEngine(f"{backend.value}:fake"), _report())

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)

    engine = open_engine(mv, SPEC, CACHE, list(BOTH), tmp_path).engine  # type: ignore[arg-type]

    assert engine.backend_name == "tensorrt:fake"
    [(backend, cache, kw)] = calls
    assert backend is Backend.TENSORRT and cache is CACHE
    assert kw["calibration"] is None and kw["validation"] is None  # fp32: nothing to guard
    assert kw["timing_cache_path"] == tmp_path / "timing" / "tensorrt.timing-cache"


def test_a_reduced_precision_tensorrt_engine_gets_the_validation_set(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path
) -> None:
    seen: dict[Backend, object] = {}
    validation = object()
    monkeypatch.setattr(loader, "validation_set", lambda version: validation)

    def load_cached_engine(
        spec: EngineSpec, backend: Backend, cache: object, **kw: object
    ) -> CacheResult:
        seen[backend] = kw["validation"]
        if backend is Backend.TENSORRT:
            raise ConfigError("accuracy guard refused the fp16 engine")
        return CacheResult(FakeEngine("onnxruntime:CPUExecutionProvider"), _report())

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)
    fp16 = replace(SPEC, precision=Precision.FP16)

    engine = open_engine(mv, fp16, CACHE, list(BOTH), tmp_path).engine  # type: ignore[arg-type]

    assert engine.backend_name == "onnxruntime:CPUExecutionProvider"
    assert seen == {Backend.TENSORRT: validation, Backend.ONNXRUNTIME: None}


def test_where_the_engine_came_from_and_an_accuracy_guard_verdict_are_kept(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path
) -> None:
    verdict = AccuracyVerdict(
        "tiny", "2", "fp16", "top1_confident", 0.91, 0.99, 64, passed=False,
        reason="agreement with FP32 ONNX Runtime: top1_confident 0.9100 (below 0.9900) on 64 images",
    )  # fmt: skip

    def load_cached_engine(
        spec: EngineSpec, backend: Backend, cache: object, **kw: object
    ) -> CacheResult:
        if backend is Backend.TENSORRT:
            raise AccuracyGuardError("accuracy guard refuses tiny/2 fp16", verdict)
        return CacheResult(FakeEngine("onnxruntime:CPUExecutionProvider"), replace(_report(), level="gcs"))

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)
    monkeypatch.setattr(loader, "validation_set", lambda version: object())

    opened = open_engine(mv, replace(SPEC, precision=Precision.FP16), CACHE, list(BOTH), tmp_path)  # type: ignore[arg-type]
    first = open_engine(mv, SPEC, CACHE, [Backend.ONNXRUNTIME], tmp_path)  # type: ignore[arg-type]

    assert opened.source == "gcs" and opened.engine.backend_name == "onnxruntime:CPUExecutionProvider"
    assert opened.fallback_reason == f"tensorrt: accuracy guard: {verdict.reason}"
    assert first.fallback_reason is None


@pytest.mark.parametrize(
    "failure",
    [
        ConfigError("no GPU visible"),
        ImportError("No module named 'tensorrt'; pip install triggerfish[gpu]"),
    ],
)
def test_a_failing_backend_falls_back_to_the_next(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path, failure: Exception
) -> None:
    tried: list[Backend] = []

    def load_cached_engine(
        spec: EngineSpec, backend: Backend, cache: object, **kw: object
    ) -> CacheResult:
        tried.append(backend)
        if backend is Backend.TENSORRT:
            raise failure
        return CacheResult(FakeEngine("onnxruntime:CPUExecutionProvider"), _report())

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)

    engine = open_engine(mv, SPEC, CACHE, list(BOTH), tmp_path).engine  # type: ignore[arg-type]

    assert engine.backend_name == "onnxruntime:CPUExecutionProvider"
    assert tried == [Backend.TENSORRT, Backend.ONNXRUNTIME]


def test_when_every_backend_fails_each_failure_is_listed(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path
) -> None:
    def load_cached_engine(
        spec: EngineSpec, backend: Backend, cache: object, **kw: object
    ) -> CacheResult:
        if backend is Backend.TENSORRT:
            raise ImportError("tensorrt is not installed")
        raise ConfigError("model.onnx is unreadable")

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)

    with pytest.raises(ConfigError) as info:
        open_engine(mv, SPEC, CACHE, list(BOTH), tmp_path)  # type: ignore[arg-type]

    message = str(info.value)
    assert "no backend could load tiny/2" in message
    assert "tensorrt: tensorrt is not installed" in message
    assert "onnxruntime: model.onnx is unreadable" in message


def test_an_unexpected_error_is_not_mistaken_for_an_unavailable_backend(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path
) -> None:
    tried: list[Backend] = []

    def load_cached_engine(
        spec: EngineSpec, backend: Backend, cache: object, **kw: object
    ) -> CacheResult:
        tried.append(backend)
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)

    # Not a refusal of the backend: no fallback, and retried later rather than refused for good.
    with pytest.raises(TransientError) as caught:
        open_engine(mv, SPEC, CACHE, list(BOTH), tmp_path)  # type: ignore[arg-type]
    assert isinstance(caught.value.__cause__, ZeroDivisionError)
    assert tried == [BOTH[0]]


@pytest.mark.parametrize(
    "failure",
    [MemoryError(), RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), OSError(5, "I/O error")],
    ids=["host-oom", "device-oom", "io"],
)
def test_a_transient_load_failure_is_transient_and_does_not_fall_back(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path, failure: BaseException
) -> None:
    tried: list[Backend] = []

    def load_cached_engine(spec: EngineSpec, backend: Backend, cache: object, **kw: object) -> CacheResult:
        tried.append(backend)
        raise failure

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)

    with pytest.raises(TransientError):
        open_engine(mv, SPEC, CACHE, list(BOTH), tmp_path)  # type: ignore[arg-type]
    assert tried == [BOTH[0]]


def test_every_backend_refusing_for_good_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, mv: ModelVersion, tmp_path: Path
) -> None:
    class InvalidProtobuf(Exception):  # the name ONNX Runtime gives an unparsable model
        pass

    def load_cached_engine(spec: EngineSpec, backend: Backend, cache: object, **kw: object) -> CacheResult:
        if backend is BOTH[0]:
            raise ConfigError("tensorrt is not installed")
        raise InvalidProtobuf("Protobuf parsing failed")

    monkeypatch.setattr(loader, "load_cached_engine", load_cached_engine)

    with pytest.raises(ConfigError, match="Protobuf parsing failed"):
        open_engine(mv, SPEC, CACHE, list(BOTH), tmp_path)  # type: ignore[arg-type]


# --- engine_spec and warm_up -----------------------------------------------------------


def test_engine_spec_describes_the_version(tmp_path: Path) -> None:
    mv = ModelVersion("tiny", "2", CONFIG, tmp_path, ("a", "b"))

    spec = engine_spec(mv, ("logits",), workers=3)

    assert spec.onnx_path == tmp_path / "model.onnx"
    assert spec.input_shape == (4, 6, 3)  # NHWC without the batch dimension
    assert (spec.input_dtype, spec.precision.value, spec.workers) == ("float32", "fp16", 3)
    assert spec.batch_sizes == (1, 2, 4) and spec.max_batch_size == 4
    assert spec.output_names == ("logits",)


def test_warm_up_runs_every_engine_batch_size() -> None:
    engine = FakeEngine("fake")
    loaded = LoadedVersion("tiny", "2", CONFIG, engine, TopKClassifier(CONFIG.postprocess), ())  # type: ignore[arg-type]

    warm_up(loaded)

    assert engine.shapes == [(1, 4, 6, 3), (2, 4, 6, 3), (4, 4, 6, 3)]


def test_warm_up_fails_when_the_engine_lacks_an_output_the_postprocessor_reads() -> None:
    engine = FakeEngine("fake", outputs=("probabilities",))
    loaded = LoadedVersion("tiny", "2", CONFIG, engine, TopKClassifier(CONFIG.postprocess), ())  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match=r"tiny/2 warm-up produced no outputs \['logits'\]"):
        warm_up(loaded)


def test_a_paced_warm_up_sleeps_after_each_batch_in_proportion_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = FakeEngine("fake")
    loaded = LoadedVersion("tiny", "2", CONFIG, engine, TopKClassifier(CONFIG.postprocess), ())  # type: ignore[arg-type]
    ticks = iter([10.0, 10.5, 20.0, 21.0, 30.0, 32.0])  # batches of 0.5 s, 1 s and 2 s
    slept: list[float] = []
    monkeypatch.setattr(loader.time, "monotonic", lambda: next(ticks))
    monkeypatch.setattr(loader.time, "sleep", slept.append)

    warm_up(loaded, pause=2.0)

    assert slept == [1.0, 2.0, 4.0]
    assert len(engine.shapes) == 3


class _LargestIsEnough(FakeEngine):
    def warm_up_sizes(self, sizes: tuple[int, ...]) -> tuple[int, ...]:
        return (max(sizes),)


def test_warm_up_runs_only_the_sizes_the_engine_asks_for() -> None:
    engine = _LargestIsEnough("fake")
    loaded = LoadedVersion("tiny", "2", CONFIG, engine, TopKClassifier(CONFIG.postprocess), ())  # type: ignore[arg-type]

    warm_up(loaded)

    assert engine.shapes == [(4, 4, 6, 3)]
    assert loaded.output_specs  # still recorded from that one run
