"""The model repository on a local folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from serve.model.repository import ModelRepository
from shared.errors import ConfigError, ErrorReason, PermanentError

SHIPPED = Path(__file__).resolve().parents[4] / "infra" / "models" / "mobilenet_v2" / "1"


def _add_version(root: Path, model: str, version: str, labels: bool = True) -> Path:
    directory = root / model / version
    directory.mkdir(parents=True)
    shutil.copy(SHIPPED / "config.yaml", directory / "config.yaml")
    if labels:
        shutil.copy(SHIPPED / "labels.txt", directory / "labels.txt")
    (directory / "model.onnx").write_bytes(b"not really onnx")
    return directory


@pytest.fixture
def root(tmp_path: Path) -> Path:
    repo = tmp_path / "models"
    for version in ("1", "2", "10", "9"):
        _add_version(repo, "mobilenet_v2", version)
    _add_version(repo, "other", "1")
    (repo / "stray").mkdir()  # a folder without versions is not a model
    (repo / "mobilenet_v2" / "empty").mkdir()  # a version without config.yaml is not a version
    return repo


def _repo(root: Path, tmp_path: Path) -> ModelRepository:
    return ModelRepository(str(root) + "/", tmp_path / "cache")


def test_models_lists_versions_sorted_numerically(root: Path, tmp_path: Path) -> None:
    repo = _repo(root, tmp_path)

    assert repo.models() == {"mobilenet_v2": ["1", "2", "9", "10"], "other": ["1"]}
    assert repo.location == str(root)


def test_resolve_without_version_gives_the_newest(root: Path, tmp_path: Path) -> None:
    mv = _repo(root, tmp_path).resolve("mobilenet_v2")

    assert (mv.name, mv.version) == ("mobilenet_v2", "10")
    assert mv.directory == root / "mobilenet_v2" / "10"
    assert mv.onnx_path == root / "mobilenet_v2" / "10" / "model.onnx"
    assert mv.config.input.height == 224
    assert len(mv.labels) == 1000
    assert mv.labels[0] and not mv.labels[0].endswith("\n")


def test_resolve_a_named_version_and_cache_it(root: Path, tmp_path: Path) -> None:
    repo = _repo(root, tmp_path)

    first = repo.resolve("mobilenet_v2", "2")

    assert first.version == "2"
    assert repo.resolve("mobilenet_v2", "2") is first


def test_an_unknown_model_is_permanent_and_names_the_known_models(
    root: Path, tmp_path: Path
) -> None:
    with pytest.raises(PermanentError) as info:
        _repo(root, tmp_path).resolve("resnet50")

    assert info.value.reason is ErrorReason.UNKNOWN_MODEL
    assert "'resnet50'" in info.value.message
    assert "['mobilenet_v2', 'other']" in info.value.message


def test_an_unknown_version_is_permanent_and_names_the_versions(root: Path, tmp_path: Path) -> None:
    with pytest.raises(PermanentError) as info:
        _repo(root, tmp_path).resolve("mobilenet_v2", "7")

    assert info.value.reason is ErrorReason.UNKNOWN_VERSION
    assert "'7'" in info.value.message
    assert "['1', '2', '9', '10']" in info.value.message


def test_refresh_picks_up_a_new_version(root: Path, tmp_path: Path) -> None:
    repo = _repo(root, tmp_path)
    assert repo.models()["other"] == ["1"]

    _add_version(root, "other", "11")

    assert repo.models()["other"] == ["1"]  # listing is cached ...
    assert repo.refresh()["other"] == ["1", "11"]  # ... until refreshed
    assert repo.resolve("other").version == "11"


def test_resolve_finds_a_version_published_after_the_last_listing(
    root: Path, tmp_path: Path
) -> None:
    repo = _repo(root, tmp_path)
    repo.models()

    _add_version(root, "other", "2")
    _add_version(root, "brand_new", "1")

    assert repo.resolve("other", "2").version == "2"
    assert repo.resolve("brand_new").version == "1"


def test_a_missing_labels_file_is_a_config_error(root: Path, tmp_path: Path) -> None:
    _add_version(root, "nolabels", "1", labels=False)

    with pytest.raises(ConfigError) as info:
        _repo(root, tmp_path).resolve("nolabels")

    assert "nolabels/1" in str(info.value)
    assert "'labels.txt'" in str(info.value)


def test_a_version_without_its_model_file_is_not_visible(root: Path, tmp_path: Path) -> None:
    (_add_version(root, "nomodel", "1") / "model.onnx").unlink()  # still being uploaded

    repo = _repo(root, tmp_path)
    assert "nomodel" not in repo.models()
    with pytest.raises(PermanentError, match="'nomodel' is not in repository"):
        repo.resolve("nomodel")


def test_an_invalid_config_is_a_config_error_naming_the_file(root: Path, tmp_path: Path) -> None:
    directory = _add_version(root, "broken", "1")
    (directory / "config.yaml").write_text("task: classification\ninput: {height: 0, width: 8}\n")

    with pytest.raises(ConfigError) as info:
        _repo(root, tmp_path).resolve("broken")

    assert str(directory / "config.yaml") in str(info.value)
    assert "input.height" in str(info.value)


def test_a_repository_that_is_not_a_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a directory"):
        ModelRepository(str(tmp_path / "nowhere"), tmp_path).models()


def test_named_versions_list_before_numbered_ones(root: Path, tmp_path: Path) -> None:
    _add_version(root, "mobilenet_v2", "beta")

    repo = _repo(root, tmp_path)

    assert repo.models()["mobilenet_v2"] == ["beta", "1", "2", "9", "10"]
    assert repo.resolve("mobilenet_v2").version == "10"  # a name is never "newest"
