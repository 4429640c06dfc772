"""Publishing a new model version: it is loaded and warmed up before it takes traffic,
requests keep succeeding throughout, and older versions stay addressable."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import pytest
import yaml

from infra.local.client import StackClient
from infra.local.emulators import upload_tree
from infra.local.stack import DEFAULT_MODEL_REPOSITORY
from serve.http.ingress import DEFAULT_VERSION_TTL_S
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration


def test_new_version_is_promoted_only_once_warm(client: StackClient, tmp_path) -> None:
    uri, generation = client.upload(SAMPLES / "coffee.jpg", name=f"coffee-{uuid.uuid4().hex[:6]}.jpg")
    client.wait_result(str(uri), 60, generation=generation)
    v2 = tmp_path / "mobilenet_v2" / "2"
    v2.mkdir(parents=True)
    source = DEFAULT_MODEL_REPOSITORY / "mobilenet_v2" / "1"
    for name in ("model.onnx", "labels.txt"):
        (v2 / name).write_bytes((source / name).read_bytes())
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["postprocess"]["top_k"] = 3  # observable difference between the versions
    (v2 / "config.yaml").write_text(yaml.safe_dump(config))

    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                statuses.append(http.post(f"{client.state.serve_url}/v1/infer", json={"uri": str(uri)}).status_code)

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        upload_tree(client.state.client_env(), tmp_path, client.state.models_bucket)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            stats = httpx.get(f"{client.state.serve_url}/v1/stats", timeout=30).json()["mobilenet_v2"]
            if stats["default_version"] == "2":
                break
            time.sleep(0.5)
    finally:
        stop.set()
        worker.join()

    assert stats["default_version"] == "2", stats
    assert statuses and set(statuses) == {200}, statuses
    time.sleep(DEFAULT_VERSION_TTL_S)  # the ingress asks for the default version again after this
    newest = client.infer(str(uri))["results"][0]
    pinned = client.infer(str(uri), version="1")["results"][0]
    assert (newest["model"]["version"], len(newest["labels"])) == ("2", 3)
    assert (pinned["model"]["version"], len(pinned["labels"])) == ("1", 5)
    assert newest["labels"][0]["label"] == pinned["labels"][0]["label"] == "espresso"
