"""A model replica that decodes on its GPU, through the fakes of nvImageCodec and CuPy.

The real MobileNetV2 runs on ONNX Runtime's CPU provider, which the tests present as
the CUDA one (``engine_on_cuda``), so everything but the GPU is the service's code:
the Ingress pipeline sends bytes, the replica's batch queue forms batches of them, and
the replica decodes them with :class:`serve.imaging.device_batch.DeviceBatchPreparer`.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

from serve.http.pipeline import InferencePipeline, Processed
from serve.model import device_decode
from serve.model.answers import Rejection, Retry, VersionInfo
from serve.model.batch import AnyItem, EncodedItem, ItemOutcome
from serve.model.model_server import ModelServer, decode_on_cpu
from serve.model_config import load_model_config
from shared.config import Settings
from shared.errors import ErrorReason
from shared.messages import EntryPath, InferenceRequest, Priority
from shared.results import Status
from tests.fakes import fake_cupy
from tests.fakes.device_imaging import install_fake_device_imaging
from tests.fakes.fake_gcs import InMemoryGcs

ROOT = Path(__file__).resolve().parents[4]
REPOSITORY = ROOT / "build" / "model-repository"
SAMPLES = sorted((ROOT / "infra" / "samples").glob("*.jpg"))
MODEL = "mobilenet_v2"
IMAGES = "triggerfish-images"
DEVICE = "nvimgcodec:cuda:0"


def _encode(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.open(SAMPLES[1]).convert(mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def replica_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("TRIGGERFISH_MODEL_REPOSITORY", str(REPOSITORY))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE", "")
    monkeypatch.setenv("TRIGGERFISH_BACKENDS", "onnxruntime")
    install_fake_device_imaging(monkeypatch)
    # The CPU provider stands in for CUDA: the fakes give the device arrays as NumPy.
    monkeypatch.setattr(device_decode, "engine_on_cuda", lambda engine: True)
    return monkeypatch


def _server(monkeypatch: pytest.MonkeyPatch, decode: str) -> ModelServer:
    monkeypatch.setenv("TRIGGERFISH_DECODE", decode)
    return ModelServer(MODEL, poll_interval_s=3600)


class InProcessModels:
    """A :class:`serve.http.pipeline.ModelClient` calling a replica in this process."""

    def __init__(self, server: ModelServer) -> None:
        self.server = server
        self.sent: list[AnyItem] = []

    def models(self) -> list[str]:
        return [MODEL]

    async def describe(self, model: str, version: str | None) -> VersionInfo:
        info = await self.server.describe(version)
        assert isinstance(info, VersionInfo), info
        return info

    async def infer_many(
        self, model: str, items: list[AnyItem], deadline: float | None
    ) -> list[ItemOutcome | Rejection | Retry]:
        self.sent += items
        return await self.server.infer_many(items, deadline)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield pool


def _run_pipeline(
    server: ModelServer, executor: ThreadPoolExecutor, images: dict[str, bytes]
) -> tuple[InProcessModels, dict[str, Processed]]:
    gcs = InMemoryGcs()
    for name, data in images.items():
        gcs.put(IMAGES, name, data, generation=1)
    settings = Settings(allowed_buckets=frozenset({IMAGES}), default_model=MODEL)
    models = InProcessModels(server)
    pipeline = InferencePipeline(settings, models, gcs, executor)
    requests = [
        InferenceRequest(uri=f"gs://{IMAGES}/{name}", request_id=f"r{i}", entry_path=EntryPath.HTTP)
        for i, name in enumerate(images)
    ]
    answers = asyncio.run(pipeline.process_many(requests))
    processed = {}
    for name, answer in zip(images, answers, strict=True):
        assert isinstance(answer, Processed), answer
        processed[name] = answer
    return models, processed


def test_a_device_replica_gets_bytes_and_answers_the_cpu_paths_labels(
    replica_env: pytest.MonkeyPatch, executor: ThreadPoolExecutor
) -> None:
    images = {p.name: p.read_bytes() for p in SAMPLES}
    images["cmyk.jpg"] = _encode("JPEG", "CMYK")  # the GPU decoder refuses CMYK
    images["photo.png"] = _encode("PNG")  # not a JPEG at all
    images["junk.jpg"] = b"not an image"

    device_models, on_device = _run_pipeline(_server(replica_env, "auto"), executor, images)
    cpu_models, on_cpu = _run_pipeline(_server(replica_env, "cpu"), executor, images)

    assert all(isinstance(item, EncodedItem) for item in device_models.sent)
    assert sorted(item.data for item in device_models.sent) == sorted(images.values())
    assert not any(isinstance(item, EncodedItem) for item in cpu_models.sent)
    junk_device, junk_cpu = on_device.pop("junk.jpg").result, on_cpu.pop("junk.jpg").result
    assert junk_device is not None and junk_cpu is not None
    assert junk_device.error is not None and junk_cpu.error is not None
    assert junk_device.error.reason is junk_cpu.error.reason is ErrorReason.NOT_AN_IMAGE
    for name, processed in on_device.items():
        device, cpu = processed.result, on_cpu[name].result
        assert device is not None and cpu is not None and device.status is Status.OK
        assert device.labels is not None and cpu.labels is not None
        assert [label.label for label in device.labels[:1]] == [label.label for label in cpu.labels[:1]], name
        assert device.labels[0].score == pytest.approx(cpu.labels[0].score, abs=0.05)
        assert device.backend == cpu.backend
        assert cpu.decode == "cpu"
        assert device.decode == ("cpu" if name in ("cmyk.jpg", "photo.png") else DEVICE), name
        # The first replica built the engine; the second found it in the shared disk cache.
        assert (device.engine_source, cpu.engine_source) == ("built", "disk")
        body = processed.to_dict()
        assert body["decode"] == device.decode and body["engine_source"] == "built"


def test_the_override_and_the_describe_answer(replica_env: pytest.MonkeyPatch) -> None:
    auto = asyncio.run(_server(replica_env, "auto").describe())
    forced = asyncio.run(_server(replica_env, "device").describe())
    off = asyncio.run(_server(replica_env, "cpu").describe())

    assert isinstance(auto, VersionInfo) and auto.decode == DEVICE
    assert isinstance(forced, VersionInfo) and forced.decode == DEVICE
    assert isinstance(off, VersionInfo) and off.decode == "cpu"


def test_without_nvimgcodec_auto_decodes_on_the_cpu_and_device_refuses_the_version(
    replica_env: pytest.MonkeyPatch,
) -> None:
    from tests.fakes.device_imaging import hide_device_imaging

    hide_device_imaging(replica_env)

    auto = asyncio.run(_server(replica_env, "auto").describe())
    forced = _server(replica_env, "device")

    assert isinstance(auto, VersionInfo) and auto.decode == "cpu"
    answer = asyncio.run(forced.stats())
    [cause] = answer["quarantined_versions"].values()
    assert "TRIGGERFISH_DECODE=device" in cause and "CuPy" in cause


def test_bytes_sent_to_a_cpu_replica_are_decoded_there(replica_env: pytest.MonkeyPatch) -> None:
    server = _server(replica_env, "cpu")
    info = asyncio.run(server.describe())
    assert isinstance(info, VersionInfo)
    items = [EncodedItem(SAMPLES[1].read_bytes(), info.version), EncodedItem(b"junk", info.version)]

    ok, junk = asyncio.run(server.infer_many(items))  # type: ignore[arg-type]

    assert isinstance(ok, ItemOutcome) and ok.labels and ok.decode == "cpu"
    assert isinstance(junk, Rejection) and junk.reason is ErrorReason.NOT_AN_IMAGE


def test_device_out_of_memory_is_transient_and_records_nothing(replica_env: pytest.MonkeyPatch) -> None:
    server = _server(replica_env, "auto")
    info = asyncio.run(server.describe())
    assert isinstance(info, VersionInfo)
    fake_cupy.STATE.fail_allocations = 100  # the batch buffers cannot be allocated

    answers = asyncio.run(server.infer_many([EncodedItem(p.read_bytes(), info.version) for p in SAMPLES]))

    assert answers and all(isinstance(a, Retry) and "out of memory" in a.message for a in answers)



def test_bytes_decoded_on_a_cpu_replica_keep_their_class() -> None:
    config = load_model_config(ROOT / "build" / "model-repository" / "mobilenet_v2" / "1" / "config.yaml")
    item = EncodedItem(SAMPLES[0].read_bytes(), "1", priority=Priority.BULK)
    decoded = decode_on_cpu(item, config, 60_000_000)
    assert (decoded.priority, decoded.version) == (Priority.BULK, "1")
