"""The model repository on a local folder."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import serve.model.repository as repository
from serve.model.repository import ModelRepository
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError

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


# --- a repository in Cloud Storage ------------------------------------------------------------


class FakeBlob:
    def __init__(self, store: FakeStorage, name: str, data: bytes, generation: int) -> None:
        self._store, self.name, self._data, self.generation = store, name, data, generation

    def download_to_filename(self, path: str) -> None:
        self._store.downloads.append(self.name)
        if self._store.failing:
            raise OSError(5, "Input/output error")
        if self._store.gate is not None:
            self._store.gate.wait(timeout=10)  # every downloader is mid-download at once
        Path(path).write_bytes(self._data)


class FakeStorage:
    """``list_blobs`` over a dict of objects, as google-cloud-storage's client answers it."""

    def __init__(self) -> None:
        self.objects: dict[str, tuple[bytes, int]] = {}
        self.downloads: list[str] = []
        self.failing = False
        self.gate: threading.Barrier | None = None

    def put(self, name: str, data: bytes) -> None:
        generation = self.objects.get(name, (b"", 0))[1] + 1
        self.objects[name] = (data, generation)

    def list_blobs(self, bucket: str, prefix: str = "") -> list[FakeBlob]:
        assert bucket == "models"
        return [FakeBlob(self, n, d, g) for n, (d, g) in sorted(self.objects.items()) if n.startswith(prefix)]


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> FakeStorage:
    storage = FakeStorage()
    for name in ("config.yaml", "labels.txt"):
        storage.put(f"repo/mobilenet_v2/1/{name}", (SHIPPED / name).read_bytes())
    storage.put("repo/mobilenet_v2/1/model.onnx", b"not really onnx")
    monkeypatch.setattr(repository, "get_storage_client", lambda: storage)
    return storage


def test_two_replicas_fetching_one_version_at_once_both_get_a_whole_copy(gcs: FakeStorage, tmp_path: Path) -> None:
    gcs.gate = threading.Barrier(2)
    repos = [ModelRepository("gs://models/repo", tmp_path / "cache") for _ in range(2)]

    with ThreadPoolExecutor(2) as pool:
        resolved = list(pool.map(lambda r: r.resolve("mobilenet_v2", "1"), repos))

    assert resolved[0].directory == resolved[1].directory
    assert (resolved[0].directory / "model.onnx").read_bytes() == b"not really onnx"
    assert len(resolved[0].labels) == 1000
    leftovers = [p.name for p in resolved[0].directory.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # each download folder was renamed into place or removed


def test_a_local_copy_is_reused_and_replaced_when_the_files_change(gcs: FakeStorage, tmp_path: Path) -> None:
    first = ModelRepository("gs://models/repo", tmp_path / "cache").resolve("mobilenet_v2", "1")
    fetched = len(gcs.downloads)
    again = ModelRepository("gs://models/repo", tmp_path / "cache").resolve("mobilenet_v2", "1")
    assert again.directory == first.directory and len(gcs.downloads) == fetched  # reused

    repo = ModelRepository("gs://models/repo", tmp_path / "cache")
    before = repo.fingerprint("mobilenet_v2", "1")
    gcs.put("repo/mobilenet_v2/1/labels.txt", b"only\nthree\nlabels")
    changed = repo.resolve("mobilenet_v2", "1")

    assert repo.fingerprint("mobilenet_v2", "1") != before
    assert changed.directory != first.directory and changed.labels == ("only", "three", "labels")


def test_a_failed_download_is_transient_and_leaves_nothing_behind(gcs: FakeStorage, tmp_path: Path) -> None:
    gcs.failing = True
    repo = ModelRepository("gs://models/repo", tmp_path / "cache")

    with pytest.raises(TransientError, match="Input/output error"):
        repo.resolve("mobilenet_v2", "1")

    folder = tmp_path / "cache" / "models" / "models" / "repo" / "mobilenet_v2"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_data_folders_are_copied_on_first_use_and_only_once(gcs: FakeStorage, tmp_path: Path) -> None:
    for i in range(3):
        gcs.put(f"repo/mobilenet_v2/1/validation/{i}.jpg", b"v%d" % i)
        gcs.put(f"repo/mobilenet_v2/1/calibration/{i}.jpg", b"c%d" % i)
    gcs.put("repo/mobilenet_v2/1/weights/extra.bin", b"external weights")
    repo = ModelRepository("gs://models/repo", tmp_path / "cache")

    mv = repo.resolve("mobilenet_v2", "1")

    # What every load reads is there; the images are not fetched yet.
    assert (mv.directory / "weights" / "extra.bin").read_bytes() == b"external weights"
    assert not [d for d in gcs.downloads if "/validation/" in d or "/calibration/" in d]
    assert not (mv.directory / "validation").exists()

    validation = mv.folder("validation")
    assert sorted(p.name for p in validation.iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert (validation / "2.jpg").read_bytes() == b"v2"
    fetched = len(gcs.downloads)
    assert mv.folder("validation") == validation and len(gcs.downloads) == fetched  # copied once
    assert not [d for d in gcs.downloads if "/calibration/" in d]
    # Another replica on the node finds the copy.
    other = ModelRepository("gs://models/repo", tmp_path / "cache").resolve("mobilenet_v2", "1")
    assert other.folder("validation") == validation
    assert sorted(p.name for p in mv.folder("calibration").iterdir()) == ["0.jpg", "1.jpg", "2.jpg"]
    assert not mv.folder("missing").exists()


def test_the_validation_folder_named_by_the_config_is_the_one_deferred(gcs: FakeStorage, tmp_path: Path) -> None:
    config = (SHIPPED / "config.yaml").read_text() + "\naccuracy_guard:\n  validation_dir: holdout\n"
    gcs.put("repo/mobilenet_v2/1/config.yaml", config.encode())
    gcs.put("repo/mobilenet_v2/1/holdout/a.jpg", b"a")
    repo = ModelRepository("gs://models/repo", tmp_path / "cache")

    mv = repo.resolve("mobilenet_v2", "1")

    assert mv.config.accuracy_guard.validation_dir == "holdout"
    assert not [d for d in gcs.downloads if "/holdout/" in d]
    assert (mv.folder("holdout") / "a.jpg").read_bytes() == b"a"


def test_a_failed_folder_copy_is_transient_and_leaves_nothing_behind(gcs: FakeStorage, tmp_path: Path) -> None:
    gcs.put("repo/mobilenet_v2/1/validation/0.jpg", b"v0")
    mv = ModelRepository("gs://models/repo", tmp_path / "cache").resolve("mobilenet_v2", "1")
    gcs.failing = True

    with pytest.raises(TransientError, match="copying mobilenet_v2/1/validation .*Input/output error"):
        mv.folder("validation")

    assert sorted(p.name for p in mv.directory.iterdir()) == ["config.yaml", "labels.txt", "model.onnx"]
    assert [p.name for p in mv.directory.parent.iterdir()] == [mv.directory.name]


def test_a_new_version_reads_each_file_once_its_config_included(gcs: FakeStorage, tmp_path: Path) -> None:
    gcs.put("repo/mobilenet_v2/1/validation/0.jpg", b"v0")

    mv = ModelRepository("gs://models/repo", tmp_path / "cache").resolve("mobilenet_v2", "1")

    assert sorted(gcs.downloads) == [
        "repo/mobilenet_v2/1/config.yaml", "repo/mobilenet_v2/1/labels.txt", "repo/mobilenet_v2/1/model.onnx",
    ]  # fmt: skip
    assert (mv.directory / "config.yaml").read_bytes() == (SHIPPED / "config.yaml").read_bytes()
