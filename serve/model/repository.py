"""The model repository: ``<repo>/<model>/<version>/{model.onnx, config.yaml, labels.txt}``.

The repository is a local folder or a ``gs://bucket/prefix``. A GCS version is
copied once into a local cache folder (atomically, by renaming a finished
download) because ONNX Runtime and TensorRT read models from local files.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from serve.model_config import ModelConfig, load_model_config
from shared.errors import ConfigError, ErrorReason, PermanentError
from shared.results import version_sort_key
from shared.storage import get_storage_client

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
CONFIG_FILE = "config.yaml"


@dataclass(frozen=True, slots=True)
class ModelVersion:
    """One servable model version, with its files on local disk."""

    name: str
    version: str
    config: ModelConfig
    directory: Path
    labels: tuple[str, ...]

    @property
    def onnx_path(self) -> Path:
        return self.directory / MODEL_FILE


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
            ConfigError: when the version's config is invalid.
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
                self._loaded[key] = self._load(model, chosen)
            return self._loaded[key]

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
        # (each GCS object appears whole, so neither can be half-written).
        return {pair for pair, files in seen.items() if files == {CONFIG_FILE, MODEL_FILE}}

    def _local_dir(self, model: str, version: str) -> Path:
        if not self._location.startswith("gs://"):
            return Path(self._location) / model / version
        bucket, prefix = self._gcs_root()
        target = self._cache_dir / "models" / bucket / prefix / model / version
        if (target / CONFIG_FILE).is_file() and (target / MODEL_FILE).is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}-"))
        base = f"{prefix}{model}/{version}/"
        count = 0
        for blob in get_storage_client().list_blobs(bucket, prefix=base):
            dest = staging / blob.name[len(base) :]
            dest.parent.mkdir(parents=True, exist_ok=True)
            blob.download_to_filename(str(dest))
            count += 1
        logger.info("fetched %d files of %s/%s from gs://%s/%s", count, model, version, bucket, base)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        return target

    def _load(self, model: str, version: str) -> ModelVersion:
        directory = self._local_dir(model, version)
        config = load_model_config(directory / CONFIG_FILE)
        if not (directory / MODEL_FILE).is_file():
            raise ConfigError(f"model {model}/{version} has no {MODEL_FILE} in {directory}")
        labels: tuple[str, ...] = ()
        if config.labels:
            path = directory / config.labels
            if not path.is_file():
                raise ConfigError(f"model {model}/{version} names labels {config.labels!r}, missing")
            labels = tuple(line.rstrip("\n") for line in path.read_text().splitlines())
        return ModelVersion(model, version, config, directory, labels)
