"""The user's own ``gcloud`` against the local stack, with the settings ``triggerfish env`` prints.

An upload with ``gcloud storage cp`` and a request with ``gcloud pubsub topics publish`` each
give a result that ``gcloud storage cat`` reads back; a model version published as the docs
show appears with its ``config.yaml`` last.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from infra.cli.env import stack_environment
from infra.local.stack import StackState

pytestmark = pytest.mark.integration

SAMPLES = Path(__file__).resolve().parents[2] / "infra" / "samples"
RESULT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def gcloud(stack: StackState, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    # A configuration directory of its own: nothing of the user's gcloud setup is read or changed.
    env = {**os.environ, **stack_environment(stack), "CLOUDSDK_CONFIG": str(tmp_path_factory.mktemp("gcloud"))}

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["gcloud", *argv], env=env, capture_output=True, text=True, timeout=120)

    return run


def _cat(gcloud, uri: str, until) -> dict[str, Any]:  # noqa: ANN001
    """``gcloud storage cat uri`` once it prints a result for which ``until`` holds."""
    deadline, last = time.monotonic() + RESULT_TIMEOUT_S, None
    while time.monotonic() < deadline:
        out = gcloud("storage", "cat", uri)
        if out.returncode == 0:
            last = json.loads(out.stdout)
            if until(last):
                return last
        time.sleep(1)
    raise AssertionError(f"no matching result at {uri} within {RESULT_TIMEOUT_S}s; last: {last or out.stderr}")


def test_gcloud_storage_cp_into_the_images_bucket_gives_a_result(gcloud, stack: StackState) -> None:  # noqa: ANN001
    target = f"gs://{stack.images_bucket}/gcloud/cat.jpg"
    copied = gcloud("storage", "cp", str(SAMPLES / "cat.jpg"), target)
    assert copied.returncode == 0, copied.stderr

    result = _cat(gcloud, f"gs://{stack.results_bucket}/mobilenet_v2/{stack.images_bucket}/gcloud/cat.jpg.json",
                  lambda r: True)  # fmt: skip
    assert result["status"] == "ok" and result["entry_path"] == "upload", result
    assert result["source"]["uri"] == target and result["labels"][0]["label"] == "Egyptian cat"


def test_gcloud_custom_metadata_picks_the_model_as_in_the_cloud(gcloud, stack: StackState) -> None:  # noqa: ANN001
    target = f"gs://{stack.images_bucket}/gcloud/text.jpg"
    copied = gcloud("storage", "cp", "--custom-metadata=triggerfish-model=text_detector", str(SAMPLES / "text.jpg"), target)
    assert copied.returncode == 0, copied.stderr

    result = _cat(gcloud, f"gs://{stack.results_bucket}/text_detector/{stack.images_bucket}/gcloud/text.jpg.json",
                  lambda r: True)  # fmt: skip
    assert result["status"] == "ok" and result["model"]["name"] == "text_detector", result
    assert result["detections"], result


def test_gcloud_pubsub_topics_publish_a_request_gives_a_result(gcloud, stack: StackState) -> None:  # noqa: ANN001
    source = f"gs://{stack.images_bucket}/gcloud/coffee.jpg"
    result_uri = f"gs://{stack.results_bucket}/mobilenet_v2/{stack.images_bucket}/gcloud/coffee.jpg.json"
    assert gcloud("storage", "cp", str(SAMPLES / "coffee.jpg"), source).returncode == 0
    # The upload gives a result of its own: wait for it, so that the request's result comes after.
    _cat(gcloud, result_uri, lambda r: r.get("entry_path") == "upload")
    message = json.dumps({"uri": source, "model": "mobilenet_v2", "request_id": "gcloud-publish"})
    published = gcloud("pubsub", "topics", "publish", stack.requests_topic, f"--message={message}")
    assert published.returncode == 0 and "messageIds" in published.stdout, published.stderr

    # Same generation and version: the request's result replaces the upload's and names its request.
    result = _cat(gcloud, result_uri, lambda r: r.get("request_id") == "gcloud-publish")
    assert result["status"] == "ok" and result["entry_path"] == "pubsub", result
    assert result["labels"][0]["label"] == "espresso"


def test_publishing_a_version_as_documented_lists_it_only_once_every_file_is_there(
    gcloud, stack: StackState, tmp_path: Path  # noqa: ANN001
) -> None:
    """docs/models-and-engines.md: the version's files with ``rsync --exclude``, then ``config.yaml``."""
    version = tmp_path / "3"
    for name in ("model.onnx", "labels.txt", "config.yaml", "validation/a.jpg", "calibration/b.jpg"):
        (version / name).parent.mkdir(parents=True, exist_ok=True)
        (version / name).write_bytes(name.encode())
    bucket = "triggerfish-publish"
    assert gcloud("storage", "buckets", "create", f"gs://{bucket}").returncode == 0
    target = f"gs://{bucket}/mobilenet_v2/3"

    synced = gcloud("storage", "rsync", "-r", "--exclude=config\\.yaml$", str(version), target)
    assert synced.returncode == 0, synced.stderr
    listed = gcloud("storage", "ls", "-r", f"{target}/**").stdout.split()
    assert sorted(u.removeprefix(f"{target}/") for u in listed) == [
        "calibration/b.jpg", "labels.txt", "model.onnx", "validation/a.jpg",
    ]  # fmt: skip

    copied = gcloud("storage", "cp", str(version / "config.yaml"), f"{target}/config.yaml")
    assert copied.returncode == 0, copied.stderr
    assert f"{target}/config.yaml" in gcloud("storage", "ls", "-r", f"{target}/**").stdout.split()
