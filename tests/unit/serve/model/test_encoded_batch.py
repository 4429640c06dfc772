"""Batches of encoded images on a replica that decodes on its GPU (fakes of nvImageCodec and
CuPy; the real MobileNetV2 on ONNX Runtime's CPU provider): fault isolation, mixed batches,
and when a version gets the device path."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serve.engines.base import EngineFault
from serve.engines.onnxruntime import OnnxRuntimeEngine
from serve.imaging.cpu_decode import prepare_image
from serve.imaging.device_batch import DeviceBatchPreparer
from serve.model import device_decode
from serve.model.batch import BatchItem, EncodedItem, EngineFailure, LoadedVersion
from serve.model.device_decode import attach_device_decode, engine_on_cuda
from serve.model.encoded_batch import run_encoded_batch
from serve.model.loader import engine_spec
from serve.model.model_server import _run_group
from serve.model.repository import ModelRepository
from serve.postprocess.factory import make_postprocessor
from shared.errors import ConfigError, ErrorReason
from tests.fakes import fake_nvimgcodec
from tests.fakes.device_imaging import install_fake_device_imaging

ROOT = Path(__file__).resolve().parents[4]
REPOSITORY = ROOT / "build" / "model-repository"
SAMPLES = sorted((ROOT / "infra" / "samples").glob("*.jpg"))
LIMIT = 10**8


@pytest.fixture(scope="module")
def cpu_loaded(tmp_path_factory) -> LoadedVersion:  # noqa: ANN001
    mv = ModelRepository(str(REPOSITORY), tmp_path_factory.mktemp("repo")).resolve("mobilenet_v2")
    post = make_postprocessor(mv.config.postprocess)
    engine = OnnxRuntimeEngine.load(engine_spec(mv, post.output_names), providers=["CPUExecutionProvider"])
    return LoadedVersion(mv.name, mv.version, mv.config, engine, post, mv.labels, engine_source="disk")


@pytest.fixture
def loaded(cpu_loaded: LoadedVersion, monkeypatch: pytest.MonkeyPatch) -> LoadedVersion:
    install_fake_device_imaging(monkeypatch)
    cfg = cpu_loaded.config
    preparer = DeviceBatchPreparer(cfg.input, cfg.preprocess, max_batch=2, max_pixels=LIMIT)
    return replace(cpu_loaded, preparer=preparer)


class FlakyEngine:
    """Delegates to a real engine; fails batches of more than one image, or always when ``broken``."""

    def __init__(self, engine: Any, *, broken: BaseException | None = None) -> None:
        self.engine, self.broken = engine, broken
        self.backend_name = engine.backend_name

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        if self.broken is not None:
            raise self.broken
        if len(batch) > 1:
            raise RuntimeError("cuDNN failed on this batch")
        return self.engine.infer(batch)


def _items(loaded: LoadedVersion, datas: list[bytes]) -> list[EncodedItem]:
    return [EncodedItem(data, loaded.version) for data in datas]


def test_batches_larger_than_the_preparer_run_in_parts_in_order(loaded: LoadedVersion) -> None:
    datas = [p.read_bytes() for p in SAMPLES]  # 5 images, preparer slots of 2

    outcomes = run_encoded_batch(loaded, _items(loaded, datas))

    cfg = loaded.config
    for data, outcome in zip(datas, outcomes, strict=True):
        image = prepare_image(data, cfg.input, cfg.preprocess, LIMIT)
        [cpu] = _run_group(loaded, [BatchItem(image.pixels, image.geometry, loaded.version)])
        assert outcome.labels is not None and cpu.labels is not None
        assert outcome.labels[0].label == cpu.labels[0].label
        assert outcome.decode == "nvimgcodec:cuda:0" and cpu.decode == "cpu"
        assert outcome.engine_source == cpu.engine_source == "disk"
    assert [o.batch_size for o in outcomes] == [2, 2, 2, 2, 1]
    assert fake_nvimgcodec.STATE.calls == [2, 2, 1]


def test_a_mixed_batch_keeps_each_items_place(loaded: LoadedVersion) -> None:
    cfg = loaded.config
    image = prepare_image(SAMPLES[1].read_bytes(), cfg.input, cfg.preprocess, LIMIT)
    items = [
        EncodedItem(SAMPLES[0].read_bytes(), loaded.version),
        BatchItem(image.pixels, image.geometry, loaded.version),
        EncodedItem(b"junk", loaded.version),
    ]

    first, second, junk = _run_group(loaded, items)  # type: ignore[arg-type]

    assert first.decode == "nvimgcodec:cuda:0" and second.decode == "cpu" and second.labels
    assert junk.error_reason is ErrorReason.NOT_AN_IMAGE


def test_an_engine_failing_on_a_batch_retries_each_image_alone(loaded: LoadedVersion) -> None:
    flaky = replace(loaded, engine=FlakyEngine(loaded.engine))
    datas = [p.read_bytes() for p in SAMPLES[:2]]

    outcomes = run_encoded_batch(flaky, _items(flaky, datas))

    assert [o.error_reason for o in outcomes] == [None, None]
    assert all(o.labels and o.decode == "nvimgcodec:cuda:0" for o in outcomes)


def test_a_failing_part_gives_back_the_slot_of_the_part_prepared_ahead(loaded: LoadedVersion) -> None:
    flaky = replace(loaded, engine=FlakyEngine(loaded.engine))
    datas = [p.read_bytes() for p in SAMPLES]  # parts of 2, 2, 1: the first fails in the engine

    outcomes = run_encoded_batch(flaky, _items(flaky, datas))

    assert [o.error_reason for o in outcomes] == [None] * len(datas)
    assert loaded.preparer._free.qsize() == 2  # both slots free: none leaked


def test_an_engine_failing_on_a_blank_image_too_is_the_engines_fault(loaded: LoadedVersion) -> None:
    broken = replace(loaded, engine=FlakyEngine(loaded.engine, broken=RuntimeError("kernel launch failed")))

    with pytest.raises(EngineFailure, match="blank image") as caught:
        run_encoded_batch(broken, _items(broken, [SAMPLES[0].read_bytes()]))
    assert not caught.value.sticky


def test_a_sticky_device_fault_fails_the_batch_for_the_replica(loaded: LoadedVersion) -> None:
    faulted = replace(loaded, engine=FlakyEngine(loaded.engine, broken=EngineFault("illegal address")))

    with pytest.raises(EngineFailure) as caught:
        run_encoded_batch(faulted, _items(faulted, [SAMPLES[0].read_bytes()]))
    assert caught.value.sticky


def test_out_of_memory_while_decoding_is_transient(loaded: LoadedVersion) -> None:
    fake_nvimgcodec.STATE.out_of_memory = 1

    [outcome] = run_encoded_batch(loaded, _items(loaded, [SAMPLES[0].read_bytes()]))

    assert outcome.retry_message is not None and "out of memory" in outcome.retry_message
    assert outcome.error_reason is None


# -- which versions get the device path -------------------------------------------------


class NamedEngine:
    def __init__(self, backend_name: str, device: int = 0) -> None:
        self.backend_name, self.device = backend_name, device


@pytest.mark.parametrize(
    ("backend", "on_cuda"),
    [
        ("onnxruntime:CUDAExecutionProvider", True),
        ("tensorrt:fp16:sm90", True),
        ("onnxruntime:CPUExecutionProvider", False),
    ],
)
def test_only_an_engine_on_cuda_decodes_on_the_device(backend: str, on_cuda: bool) -> None:
    assert engine_on_cuda(NamedEngine(backend)) is on_cuda


def test_attach_follows_the_mode_the_engine_and_the_replica(cpu_loaded: LoadedVersion) -> None:
    made: list[int] = []

    def make(spec: object, pre: object, *, max_batch: int, max_pixels: int, device: int) -> Any:
        made.append(device)
        return type("Preparer", (), {"name": f"nvimgcodec:cuda:{device}"})()

    def version(backend: str) -> LoadedVersion:
        return replace(cpu_loaded, engine=NamedEngine(backend, device=1))  # type: ignore[arg-type]

    cuda = "onnxruntime:CUDAExecutionProvider"
    off, auto, no_gpu, cpu_engine = version(cuda), version(cuda), version(cuda), version("onnxruntime:CPUExecutionProvider")
    attach_device_decode(off, "cpu", LIMIT, unavailable=lambda d: None, make_preparer=make)
    attach_device_decode(auto, "auto", LIMIT, unavailable=lambda d: None, make_preparer=make)
    attach_device_decode(no_gpu, "auto", LIMIT, unavailable=lambda d: "no CUDA device", make_preparer=make)
    attach_device_decode(cpu_engine, "auto", LIMIT, unavailable=lambda d: None, make_preparer=make)

    assert [v.decode for v in (off, auto, no_gpu, cpu_engine)] == ["cpu", "nvimgcodec:cuda:1", "cpu", "cpu"]
    assert made == [1]
    with pytest.raises(ConfigError, match="TRIGGERFISH_DECODE=device .* not CUDA"):
        attach_device_decode(cpu_engine, "device", LIMIT, unavailable=lambda d: None, make_preparer=make)
    with pytest.raises(ConfigError, match="no CUDA device"):
        attach_device_decode(no_gpu, "device", LIMIT, unavailable=lambda d: "no CUDA device", make_preparer=make)


def test_the_device_index_comes_from_the_engine() -> None:
    trt = type("Trt", (), {"identity": type("Id", (), {"device_index": 2})()})()
    assert device_decode.engine_device(NamedEngine("onnxruntime:CUDAExecutionProvider", 3)) == 3
    assert device_decode.engine_device(trt) == 2


def test_warm_up_runs_the_device_pipeline_once(loaded: LoadedVersion) -> None:
    from serve.model.loader import warm_up

    warm_up(loaded)

    assert fake_nvimgcodec.STATE.calls == [1]
