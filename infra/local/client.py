"""A client of a running local stack, used by the CLI, the demo, the benchmark and tests."""

from __future__ import annotations

import json
import mimetypes
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from infra.local.stack import StackState
from shared.messages import MODEL_METADATA_KEY
from shared.results import (
    invalid_source_object_name,
    result_object_name,
    superseded_error_object_name,
)
from shared.uris import GcsUri, parse_gcs_uri


class ResultTimeout(TimeoutError):
    """No result appeared in time."""


class StackClient:
    """Talks to the emulators and Serve of the stack described by ``state``."""

    def __init__(self, state: StackState) -> None:
        self.state = state
        self._storage = None
        self._publisher = None

    @property
    def storage(self):  # noqa: ANN201
        if self._storage is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            self._storage = storage.Client(
                project=self.state.project,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.state.storage_host},
            )
        return self._storage

    @property
    def publisher(self):  # noqa: ANN201
        if self._publisher is None:
            from google.cloud import pubsub_v1

            # The Pub/Sub client reads the emulator address only from the environment.
            os.environ["PUBSUB_EMULATOR_HOST"] = self.state.pubsub_host
            self._publisher = pubsub_v1.PublisherClient()
        return self._publisher

    def upload(
        self,
        path: Path,
        name: str | None = None,
        bucket: str | None = None,
        model: str | None = None,
        data: bytes | None = None,
    ) -> tuple[GcsUri, str]:
        """Upload a file (or ``data``) to the images bucket; returns its URI and generation.

        ``model`` is set as the object's ``triggerfish-model`` metadata, which the
        upload function uses instead of the default model.
        """
        if data is None and not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        uri = GcsUri(bucket or self.state.images_bucket, name or path.name)
        blob = self.storage.bucket(uri.bucket).blob(uri.name)
        if model:
            blob.metadata = {MODEL_METADATA_KEY: model}
        content_type = mimetypes.guess_type(uri.name)[0] or "application/octet-stream"
        if data is None:
            data = path.read_bytes()
        blob.upload_from_string(data, content_type=content_type)
        return uri, str(blob.generation)

    def publish(
        self,
        uris: Sequence[str],
        model: str | None = None,
        version: str | None = None,
        request_id: str | None = None,
        raw: bytes | None = None,
    ) -> tuple[str, str]:
        """Publish a request message (or ``raw`` bytes); returns (message id, request id)."""
        request_id = request_id or f"cli-{uuid.uuid4().hex[:12]}"
        if raw is None:
            body: dict[str, Any] = {"uris": list(uris)} if len(uris) != 1 else {"uri": uris[0]}
            body["request_id"] = request_id
            if model:
                body["model"] = model
            if version:
                body["version"] = version
            raw = json.dumps(body).encode()
        topic = self.publisher.topic_path(self.state.project, self.state.requests_topic)
        message_id = self.publisher.publish(topic, raw).result(timeout=30)
        return str(message_id), request_id

    def infer(
        self, target: str | Path, model: str | None = None, version: str | None = None, timeout: float = 120
    ) -> dict[str, Any]:
        """Call Serve's ``POST /v1/infer`` with a ``gs://`` URI or a local file's bytes."""
        url = f"{self.state.serve_url}/v1/infer"
        if isinstance(target, str) and target.startswith("gs://"):
            body: dict[str, Any] = {"uri": target}
            if model:
                body["model"] = model
            if version:
                body["version"] = version
            response = httpx.post(url, json=body, timeout=timeout)
        else:
            path = Path(target)
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            params = {k: v for k, v in (("model", model), ("version", version)) if v}
            content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            response = httpx.post(
                url, content=path.read_bytes(), params=params,
                headers={"content-type": content_type}, timeout=timeout,
            )  # fmt: skip
        if response.status_code >= 500:
            raise RuntimeError(f"Serve answered {response.status_code}: {response.text[:300]}")
        return response.json()

    def find_result(
        self,
        uri: str,
        model: str | None = None,
        generation: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any] | None:
        """The stored result for ``uri`` and ``model``, if it matches the filters."""
        model = model or self.state.default_model
        bucket = self.storage.bucket(self.state.results_bucket)
        try:
            source = parse_gcs_uri(uri)
        except Exception:  # noqa: BLE001 - invalid URIs are stored under _invalid/
            if request_id is None:
                return None
            blob = bucket.get_blob(invalid_source_object_name(request_id, uri))
            return self._read(blob) if blob else None
        blob = bucket.get_blob(result_object_name(model, source))
        result = self._read(blob) if blob else None
        if result is not None and generation and result.get("source", {}).get("generation") != generation:
            return None
        if request_id and (result is None or result.get("request_id") != request_id):
            # A request whose error a stored result outranks keeps its record by request id.
            kept = bucket.get_blob(superseded_error_object_name(request_id, uri))
            return self._read(kept) if kept else None
        return result

    def _read(self, blob) -> dict[str, Any]:  # noqa: ANN001
        result = json.loads(blob.download_as_bytes())
        result["result_uri"] = f"gs://{blob.bucket.name}/{blob.name}"
        return result

    def wait_result(self, uri: str, timeout: float = 120, **filters: str | None) -> dict[str, Any]:
        """Poll until :meth:`find_result` returns something."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.find_result(uri, **filters)
            if result is not None:
                return result
            time.sleep(0.25)
        raise ResultTimeout(f"no result for {uri} after {timeout:.0f}s")
