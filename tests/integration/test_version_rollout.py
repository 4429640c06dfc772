"""Publishing a new model version: it is loaded and warmed up before it takes traffic,
requests keep succeeding throughout, and older versions stay addressable.

The rollout-under-load case needs the chaos knob in Serve's environment when the
stack starts (``TRIGGERFISH_CHAOS_FAIL_LOAD``, see :mod:`serve.model.chaos`), set
below when this module is collected.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from infra.local.client import StackClient
from infra.local.emulators import upload_tree
from infra.local.stack import DEFAULT_MODEL_REPOSITORY
from serve.http.model_client import DEFAULT_VERSION_TTL_S
from serve.model.chaos import FAIL_LOAD_ENV, marker_path
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

MODEL = "mobilenet_v2"
# Newer than any version another test publishes; its first load on this machine fails once.
CHAOS_VERSION = "50"
ROLLOUT_MESSAGES = 200
# Serve inherits this process's environment when the session's stack starts, which may
# be before this module's tests run: the chaos knob is armed when the module is
# collected. Only version 50 is targeted, which no other test publishes.
os.environ.setdefault(FAIL_LOAD_ENV, f"{MODEL}/{CHAOS_VERSION}")


def publish_version(client: StackClient, root: Path, version: str, top_k: int) -> None:
    directory = root / MODEL / version
    directory.mkdir(parents=True)
    source = DEFAULT_MODEL_REPOSITORY / MODEL / "1"
    for name in ("model.onnx", "labels.txt"):
        (directory / name).write_bytes((source / name).read_bytes())
    config = yaml.safe_load((source / "config.yaml").read_text())
    config["postprocess"]["top_k"] = top_k  # observable difference between the versions
    (directory / "config.yaml").write_text(yaml.safe_dump(config))
    upload_tree(client.state.client_env(), root, client.state.models_bucket)


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


def test_rollout_under_load_with_a_failing_first_load_ends_every_input_ok(
    client: StackClient, tmp_path: Path
) -> None:
    """200 one-URI messages while a version is published whose first load fails (transient):
    every input ends ``ok`` at the old or the new version, and no ``unknown_version`` record exists."""
    before = httpx.get(f"{client.state.serve_url}/v1/stats", timeout=30).json()[MODEL]["default_version"]
    data = (SAMPLES / "coffee.jpg").read_bytes()
    prefix = f"rollout-{uuid.uuid4().hex[:8]}"
    published = threading.Event()
    # Re-arm the fault: a marker left by an earlier run on this machine would disarm it.
    marker_path(MODEL, CHAOS_VERSION, os.environ).unlink(missing_ok=True)

    def upload(index: int) -> str:
        if index == ROLLOUT_MESSAGES // 4:
            publish_version(client, tmp_path, CHAOS_VERSION, top_k=2)
            published.set()
        uri, _ = client.upload(SAMPLES / "coffee.jpg", name=f"{prefix}/{index:03d}.jpg", data=data)
        return str(uri)

    with ThreadPoolExecutor(4) as pool:
        uris = list(pool.map(upload, range(ROLLOUT_MESSAGES)))
    assert published.is_set()

    deadline = time.monotonic() + 240
    results: dict[str, dict | None] = dict.fromkeys(uris)
    while time.monotonic() < deadline and any(r is None for r in results.values()):
        missing = [u for u, r in results.items() if r is None]
        with ThreadPoolExecutor(8) as pool:
            for uri, found in zip(missing, pool.map(lambda u: client.find_result(u, MODEL), missing), strict=True):
                results[uri] = found
        time.sleep(1)

    unanswered = [u for u, r in results.items() if r is None]
    assert not unanswered, f"{len(unanswered)} of {ROLLOUT_MESSAGES} inputs have no result"
    outcomes = {(r["status"], r["model"].get("version")) for r in results.values() if r}
    assert outcomes <= {("ok", before), ("ok", CHAOS_VERSION)}, outcomes
    # The injected failure happened and was retried, not quarantined.
    stats = httpx.get(f"{client.state.serve_url}/v1/stats", timeout=30).json()[MODEL]
    assert stats["transient_load_failures"].get(CHAOS_VERSION, 0) >= 1, (
        f"no failed load of {CHAOS_VERSION}: Serve was started without {FAIL_LOAD_ENV}", stats
    )
    assert stats["default_version"] == CHAOS_VERSION and CHAOS_VERSION not in stats["quarantined_versions"], stats
    # No unknown_version anywhere: neither at the inputs' names nor kept as an outranked error.
    bucket = client.storage.bucket(client.state.results_bucket)
    # Only this test's inputs: other tests send unknown versions on purpose.
    ours = set(uris)
    records = [json.loads(blob.download_as_bytes()) for blob in bucket.list_blobs(prefix="_superseded/")]
    refused = [
        r for r in records
        if r.get("source", {}).get("uri") in ours and r.get("error", {}).get("reason") == "unknown_version"
    ]
    assert not refused, refused[:3]
