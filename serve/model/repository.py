"""The model repository: ``<repo>/<model>/<version>/{model.onnx, config.yaml, labels.txt}``.

The repository is a local folder or a ``gs://bucket/prefix``. A GCS version is
copied into a local cache folder because ONNX Runtime and TensorRT read models
from local files. The copy is named by the *fingerprint* of the version's files
(object names and generations), downloaded into a folder of its own and renamed
into place: two replicas on one node racing the same copy each finish their own
download and the loser uses the winner's, and a version whose files change (a
half upload completed) gets a fresh copy instead of the stale one.

Only what every load reads is copied with it: the config, the model and the
version's other top-level files. The data folders (``validation/`` and
``calibration/``, hundreds of small images) are copied on first use
(:meth:`ModelVersion.folder`): only reduced-precision TensorRT builds read them,
and a replica that loads a cached engine, or runs ONNX Runtime, never does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from serve.model_config import AccuracyGuardSpec, ModelConfig, load_model_config
from shared.errors import ConfigError, ErrorReason, PermanentError, TransientError
from shared.results import version_sort_key
from shared.storage import get_storage_client

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.yaml"
#: INT8 calibration images of a version (its validation images' folder is in its config).
CALIBRATION_DIR = "calibration"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One servable model version, with its files on local disk."""

    name: str
    version: str
    config: ModelConfig
    directory: Path
    labels: tuple[str, ...]
    # Copies one of the version's data folders to local disk on first use (Cloud Storage).
    fetch_folder: Callable[[str], Path] | None = field(default=None, repr=False, compare=False)

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE

    def folder(self, name: str) -> Path:
        """The version's folder ``name`` on local disk, copied now if it is not yet
        (it may not exist: a version without validation images has no such folder).

        Raises:
            TransientError: the copy from Cloud Storage failed.
        """
        return self.directory / name if self.fetch_folder is None else self.fetch_folder(name)


class ModelRepository:
    """Lists models and resolves ``(model, version)`` to a loaded :class:`ModelVersion`."""

    def __init__(self, location: str, cache_dir: Path) -> None:
        self._location = location.rstrip("/")
        self._cache_dir = cache_dir
        self._lock = threading.Lock()
        self._index: dict[str, list[str]] | None = None
        self._loaded: dict[tuple[str, str], ModelVersion] = {}

    @property
    def location(self) -> str:
        return self._location

    def models(self) -> dict[str, list[str]]:
        """Model name -> versions, oldest first."""
        with self._lock:
            if self._index is None:
                self._index = self._list()
            return {k: list(v) for k, v in self._index.items()}

    def refresh(self) -> dict[str, list[str]]:
        """Re-list the repository (new versions become visible)."""
        with self._lock:
            self._index = self._list()
        return self.models()

    def resolve(self, model: str, version: str | None = None) -> ModelVersion:
        """Return ``model`` at ``version`` (newest when ``None``), fetching its files if needed.

        Raises:
            PermanentError: ``unknown_model`` / ``unknown_version``.
            ConfigError: when the version's config is invalid or a file it names is missing.
            TransientError: the files could not be read or fetched (I/O, Cloud Storage).
        """
        versions = self.models().get(model)
        if versions is None or (version is not None and version not in versions):
            versions = self.refresh().get(model)  # maybe published since the last listing
        if versions is None:
            known = sorted(self.models())
            raise PermanentError(
                ErrorReason.UNKNOWN_MODEL,
                f"model {model!r} is not in repository {self._location} (models: {known})",
            )
        chosen = version or versions[-1]
        if chosen not in versions:
            raise PermanentError(
                ErrorReason.UNKNOWN_VERSION,
                f"model {model!r} has no version {chosen!r} (versions: {versions})",
            )
        with self._lock:
            key = (model, chosen)
            if key not in self._loaded:
                try:
                    self._loaded[key] = self._load(model, chosen)
                except (ConfigError, PermanentError, TransientError):
                    raise
                except Exception as err:  # noqa: BLE001 - I/O and Cloud Storage errors are worth a retry
                    raise TransientError(f"reading {model}/{chosen} from {self._location} failed: {err!r}") from err
            return self._loaded[key]

    def forget(self, model: str, version: str) -> None:
        """Drop what was read of ``model/version``: the next :meth:`resolve` reads its files again."""
        with self._lock:
            self._loaded.pop((model, version), None)

    def fingerprint(self, model: str, version: str) -> str:
        """A digest of the version's files (names and generations, or sizes and mtimes).

        It changes whenever a file of the version is added, replaced or removed, so a
        version refused for its files is looked at again once they change.
        """
        try:
            if self._location.startswith("gs://"):
                return _digest(sorted((name, str(generation)) for name, generation, _ in self._gcs_files(model, version)))
            directory = Path(self._location) / model / version
            entries = sorted(
                (str(p.relative_to(directory)), f"{p.stat().st_size}:{p.stat().st_mtime_ns}")
                for p in directory.rglob("*")
                if p.is_file()
            )
        except Exception as err:  # noqa: BLE001 - a listing that fails says nothing about the files
            raise TransientError(f"listing {model}/{version} in {self._location} failed: {err!r}") from err
        return _digest(entries)

    def _list(self) -> dict[str, list[str]]:
        if self._location.startswith("gs://"):
            pairs = self._list_gcs()
        else:
            root = Path(self._location)
            if not root.is_dir():
                raise ConfigError(f"model repository {root} is not a directory")
            pairs = {
                (p.parent.parent.name, p.parent.name)
                for p in root.glob(f"*/*/{CONFIG_FILE}")
                if (p.parent / MODEL_FILE).is_file()
            }
        index: dict[str, list[str]] = {}
        for model, version in pairs:
            index.setdefault(model, []).append(version)
        return {m: sorted(v, key=version_sort_key) for m, v in sorted(index.items())}

    def _gcs_root(self) -> tuple[str, str]:
        """``gs://bucket/some/prefix`` -> ``("bucket", "some/prefix/")``."""
        bucket, _, prefix = self._location[len("gs://") :].partition("/")
        return bucket, f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    def _list_gcs(self) -> set[tuple[str, str]]:
        bucket, prefix = self._gcs_root()
        seen: dict[tuple[str, str], set[str]] = {}
        for blob in get_storage_client().list_blobs(bucket, prefix=prefix):
            parts = blob.name[len(prefix) :].split("/")
            if len(parts) == 3 and parts[2] in (CONFIG_FILE, MODEL_FILE):
                seen.setdefault((parts[0], parts[1]), set()).add(parts[2])
        # A version being uploaded is invisible until both of its key files exist
        # (each GCS object appears whole, so neither can be half-written). Publishers
        # upload config.yaml last (docs/models-and-engines.md), so a listed version
        # has its labels and validation images too.
        return {pair for pair, files in seen.items() if files == {CONFIG_FILE, MODEL_FILE}}

    def _gcs_files(self, model: str, version: str) -> list[tuple[str, int | None, object]]:
        """``(relative name, generation, blob)`` of every object of one version."""
        bucket, prefix = self._gcs_root()
        base = f"{prefix}{model}/{version}/"
        return [
            (blob.name[len(base) :], blob.generation, blob)
            for blob in get_storage_client().list_blobs(bucket, prefix=base)
            if not blob.name.endswith("/")
        ]

    def _local_dir(self, model: str, version: str) -> tuple[Path, Callable[[str], Path] | None]:
        """The version's folder on local disk, and what copies a data folder into it."""
        if not self._location.startswith("gs://"):
            return Path(self._location) / model / version, None
        bucket, prefix = self._gcs_root()
        files = self._gcs_files(model, version)
        fingerprint = _digest(sorted((name, str(generation)) for name, generation, _ in files))
        parent = self._cache_dir / "models" / bucket / prefix / model
        target = parent / f"{version}@{fingerprint[:16]}"
        cached = (target / CONFIG_FILE).is_file() and (target / MODEL_FILE).is_file()
        with tempfile.TemporaryDirectory() as tmp:
            config: Path | None = target / CONFIG_FILE
            if not cached:
                # Read once: for the folders it names, then copied in as it is.
                config_blob = next((blob for name, _, blob in files if name == CONFIG_FILE), None)
                config = Path(tmp) / CONFIG_FILE if config_blob is not None else None
                if config_blob is not None:
                    config_blob.download_to_filename(str(config))  # type: ignore[attr-defined]
            deferred = _data_folders(config)
            later = [(name, blob) for name, _, blob in files if name.split("/", 1)[0] in deferred]
            if not cached:
                now = [
                    (name, config if name == CONFIG_FILE else blob)
                    for name, _, blob in files
                    if name.split("/", 1)[0] not in deferred
                ]
                _copy_into(target, now, f"{model}/{version}")

        def fetch_folder(folder: str) -> Path:
            dest = target / folder
            if dest.is_dir():
                return dest
            wanted = [(name[len(folder) + 1 :], blob) for name, blob in later if name.startswith(f"{folder}/")]
            if wanted:
                try:
                    _copy_into(dest, wanted, f"{model}/{version}/{folder}")
                except Exception as err:  # noqa: BLE001 - I/O and Cloud Storage errors are worth a retry
                    raise TransientError(
                        f"copying {model}/{version}/{folder} from {self._location} failed: {err!r}"
                    ) from err
            return dest

        return target, fetch_folder

    def _load(self, model: str, version: str) -> ModelVersion:
        directory, fetch_folder = self._local_dir(model, version)
        config = load_model_config(directory / CONFIG_FILE)
        if not (directory / MODEL_FILE).is_file():
            raise ConfigError(f"model {model}/{version} has no {MODEL_FILE} in {directory}")
        labels: tuple[str, ...] = ()
        if config.labels:
            path = directory / config.labels
            if not path.is_file():
                raise ConfigError(f"model {model}/{version} names labels {config.labels!r}, missing")
            labels = tuple(line.rstrip("\n") for line in path.read_text().splitlines())
        return ModelVersion(model, version, config, directory, labels, fetch_folder)


def _data_folders(config: Path | None) -> set[str]:
    """The version's folders copied on first use: calibration, and validation as its
    config names it."""
    folders = {CALIBRATION_DIR, AccuracyGuardSpec().validation_dir}
    if config is None:
        return folders
    # A config that does not load is reported by the load, which reads it again.
    with contextlib.suppress(Exception):
        folders.add(load_model_config(config).accuracy_guard.validation_dir.strip("/").split("/", 1)[0])
    return folders


def _copy_into(target: Path, files: list[tuple[str, object]], what: str) -> None:
    """Download ``files`` (relative name, blob) into ``target``, which appears whole or not at all.

    A folder of its own per download, renamed into place: another replica on this
    node may be copying the same files right now, and the loser uses the winner's copy.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        for name, blob in files:
            dest = staging / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(blob, Path):  # already read (the config)
                shutil.copyfile(blob, dest)
            else:
                blob.download_to_filename(str(dest))  # type: ignore[attr-defined]
        logger.info("fetched %d files of %s", len(files), what)
        try:
            os.rename(staging, target)  # atomic; fails when the target exists
        except OSError:
            if not target.is_dir():
                raise
            logger.info("%s was fetched by another process meanwhile; using its copy", what)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _digest(entries: list[tuple[str, str]]) -> str:
    return hashlib.sha256(repr(entries).encode()).hexdigest()
