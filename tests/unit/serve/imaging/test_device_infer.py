"""Bytes in, labels out through the device pipeline, against the CPU path of the model deployment."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from serve.engines.onnxruntime import OnnxRuntimeEngine
from serve.imaging.cpu_decode import prepare_image
from serve.imaging.device_batch import DeviceBatchPreparer
from serve.imaging.device_infer import EncodedResult, infer_encoded, run_engine_on_device
from serve.model.batch import BatchItem, LoadedVersion, run_batch
from serve.model.loader import engine_spec
from serve.model.repository import ModelRepository
from serve.postprocess.factory import make_postprocessor
from shared.errors import ErrorReason, PermanentError
from tests.fakes import fake_nvimgcodec
from tests.fakes.device_imaging import install_fake_device_imaging

ROOT = Path(__file__).resolve().parents[4]
REPOSITORY = ROOT / "build" / "model-repository"
LIMIT = 10**8


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> LoadedVersion:  # noqa: ANN001
    mv = ModelRepository(str(REPOSITORY), tmp_path_factory.mktemp("repo")).resolve("mobilenet_v2")
    post = make_postprocessor(mv.config.postprocess)
    spec = engine_spec(mv, post.output_names)
    engine = OnnxRuntimeEngine.load(spec, providers=["CPUExecutionProvider"])
    return LoadedVersion(mv.name, mv.version, mv.config, engine, post, mv.labels)


@pytest.fixture(autouse=True)
def fake_device(monkeypatch):  # noqa: ANN201
    install_fake_device_imaging(monkeypatch)


def _preparer(loaded: LoadedVersion, max_batch: int = 8) -> DeviceBatchPreparer:
    cfg = loaded.config
    return DeviceBatchPreparer(cfg.input, cfg.preprocess, max_batch=max_batch, max_pixels=LIMIT)


def test_labels_match_the_cpu_path_and_bad_inputs_fail_alone(loaded) -> None:  # noqa: ANN001
    photos = [p.read_bytes() for p in sorted((ROOT / "infra" / "samples").glob("*.jpg"))]
    datas = [photos[0], b"not an image", *photos[1:]]
    results = infer_encoded(loaded, _preparer(loaded), datas)
    assert len(results) == len(datas)
    error = results[1]
    assert isinstance(error, PermanentError) and error.reason is ErrorReason.NOT_AN_IMAGE
    cfg = loaded.config
    for data, result in zip(photos, [results[0], *results[2:]], strict=True):
        assert isinstance(result, EncodedResult)
        assert result.decode == "nvimgcodec:cuda:0" and result.detections is None
        prepared = prepare_image(data, cfg.input, cfg.preprocess, LIMIT)
        (cpu,) = run_batch(loaded, [BatchItem(prepared.pixels, prepared.geometry, loaded.version)])
        assert result.labels[0].label == cpu.labels[0].label
        assert result.labels[0].score == pytest.approx(cpu.labels[0].score, abs=0.05)
        assert len(result.labels) == len(cpu.labels)


def test_an_image_the_gpu_decoder_refuses_says_it_was_decoded_on_the_cpu(loaded) -> None:  # noqa: ANN001
    fake_nvimgcodec.STATE.refuse_progressive = True
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.open(ROOT / "infra" / "samples" / "cat.jpg").save(buf, "JPEG", progressive=True)
    results = infer_encoded(loaded, _preparer(loaded), [buf.getvalue()])
    assert [r.decode for r in results] == ["cpu"]


def test_a_batch_of_only_bad_inputs_does_not_run_the_engine(loaded) -> None:  # noqa: ANN001
    class NoEngine:
        def infer_bound(self, batch):  # noqa: ANN001, ANN202
            raise AssertionError("engine called for an empty batch")

    empty = LoadedVersion(
        loaded.model, loaded.version, loaded.config, NoEngine(), loaded.postprocess, loaded.labels
    )
    results = infer_encoded(empty, _preparer(loaded), [b"x", b"y"])
    assert all(isinstance(r, PermanentError) for r in results)


def test_an_engine_without_iobinding_gets_one_host_copy() -> None:
    class HostEngine:
        def __init__(self) -> None:
            self.seen: list[np.ndarray] = []

        def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
            self.seen.append(batch)
            return {"out": batch.sum(axis=(1, 2, 3))}

    class CupyLike:
        def __init__(self, host: np.ndarray) -> None:
            self.host = host

        def get(self) -> np.ndarray:  # cupy.ndarray.get(): device to host
            return self.host.copy()

    engine = HostEngine()
    out = run_engine_on_device(engine, CupyLike(np.ones((2, 3, 4, 4), dtype=np.float32)))
    assert out["out"].tolist() == [48.0, 48.0] and isinstance(engine.seen[0], np.ndarray)
