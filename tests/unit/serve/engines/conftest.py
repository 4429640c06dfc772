"""Fixtures for engine tests: tiny ONNX models, fake TensorRT/CUDA, fake-gcs-server."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from serve.engines.base import EngineSpec
from tests.fakes import FakeGpuHandle, install_fake_gpu
from tests.fakes.fake_gcs import FakeGcs
from tests.unit.serve.engines.onnx_models import classifier_onnx, make_spec

_bucket_ids = itertools.count()


@pytest.fixture
def onnx_path(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(classifier_onnx())
    return path


@pytest.fixture
def spec(onnx_path: Path) -> EngineSpec:
    return make_spec(onnx_path)


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch) -> FakeGpuHandle:
    """Fake ``tensorrt`` + ``cuda`` in ``sys.modules`` (an H100, TensorRT 10.3.0)."""
    return install_fake_gpu(monkeypatch)


@pytest.fixture(scope="session")
def fake_gcs() -> Iterator[FakeGcs]:
    server = FakeGcs()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gcs_bucket(fake_gcs: FakeGcs):  # noqa: ANN201 - google.cloud.storage.Bucket
    """A fresh, empty bucket on the fake-gcs-server."""
    client = fake_gcs.client()
    return client.create_bucket(f"engines-{next(_bucket_ids)}")
