"""A bad newest version never takes a model down: the replica quarantines it and serves
the newest version that loads (real ONNX Runtime on the bundled MobileNetV2)."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from infra.local.stack import DEFAULT_MODEL_REPOSITORY
from serve.model.model_server import ModelServer


@pytest.fixture
def repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    source = DEFAULT_MODEL_REPOSITORY / "mobilenet_v2" / "1"
    if not source.is_dir():
        pytest.fail(f"{source} is missing: run `make model` first")
    root = tmp_path / "models"
    shutil.copytree(source, root / "mobilenet_v2" / "1")
    monkeypatch.setenv("TRIGGERFISH_MODEL_REPOSITORY", str(root))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE_DIR", str(tmp_path / "engines"))
    monkeypatch.setenv("TRIGGERFISH_ENGINE_CACHE", "")
    return root


@pytest.mark.parametrize("damage", ["truncated_onnx", "config_typo"])
def test_a_broken_newest_version_is_quarantined_and_the_previous_one_served(
    repository: Path, damage: str
) -> None:
    good, bad = repository / "mobilenet_v2" / "1", repository / "mobilenet_v2" / "2"
    shutil.copytree(good, bad)
    if damage == "truncated_onnx":  # half an upload: protobuf cannot parse it
        data = (good / "model.onnx").read_bytes()
        (bad / "model.onnx").write_bytes(data[: len(data) // 2])
    else:
        (bad / "config.yaml").write_text((good / "config.yaml").read_text().replace("task:", "tsak:"))

    server = ModelServer("mobilenet_v2", poll_interval_s=3600)

    assert server._default == "1"
    assert list(server._quarantined) == ["2"]
    asyncio.run(server.check_health())  # healthy: the quarantine is not a fault


def test_a_replica_starts_before_any_version_exists(repository: Path) -> None:
    shutil.rmtree(repository / "mobilenet_v2")
    (repository / "mobilenet_v2").mkdir()

    server = ModelServer("mobilenet_v2", poll_interval_s=3600)

    assert server._default is None and not server._quarantined
