"""``triggerfish submit`` on the local stack: a real backfill of a few hundred objects,
interrupted and resumed without publishing anything twice; a dry run; a list of URIs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from infra.local.client import StackClient
from infra.local.stack import REPO_ROOT, StackState
from infra.ops.backfill import common_prefix, result_name
from shared.messages import MODEL_METADATA_KEY
from shared.result_store import STATUS_METADATA_KEY
from shared.uris import parse_gcs_uri
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

MODEL = "mobilenet_v2"
# Fixture objects name a model that is not served, so the upload events they cause
# only record a cheap unknown_model result elsewhere and leave the backfill's results alone.
FIXTURE_MODEL = "backfill-fixture"


@pytest.fixture
def state_dir(stack: StackState, tmp_path: Path) -> Path:
    """A state directory through which the CLI finds the session's stack (and keeps its journal)."""
    stack.save(tmp_path)
    return tmp_path


def _cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.cli.main", *args]


def _env(state_dir: Path) -> dict[str, str]:
    return {**os.environ, "TRIGGERFISH_STATE_DIR": str(state_dir)}


def submit(state_dir: Path, *args: str, timeout: float = 120) -> tuple[int, dict]:
    done = subprocess.run(
        _cli_argv("submit", *args, "--json"),
        env=_env(state_dir), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr[-2000:]
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


def upload_fixtures(client: StackClient, prefix: str, count: int) -> list[str]:
    samples = [p.read_bytes() for p in sorted(SAMPLES.glob("*.jpg")) if p.name != "text.jpg"]
    bucket = client.storage.bucket(client.state.images_bucket)

    def upload(i: int) -> str:
        blob = bucket.blob(f"{prefix}/img-{i:04d}.jpg")
        blob.metadata = {MODEL_METADATA_KEY: FIXTURE_MODEL}
        blob.upload_from_string(samples[i % len(samples)], content_type="image/jpeg")
        return f"gs://{bucket.name}/{blob.name}"

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(upload, range(count)))


def results_under(client: StackClient, uris: list[str], version: str = "1") -> dict[str, str]:
    """Result name -> status, for the results of ``uris`` stored so far (listing only)."""
    names = {result_name(MODEL, version, parse_gcs_uri(u)) for u in uris}
    blobs = client.storage.list_blobs(client.state.results_bucket, prefix=common_prefix(names))
    return {
        b.name: (b.metadata or {}).get(STATUS_METADATA_KEY, "?") for b in blobs if b.name in names
    }


def test_an_interrupted_backfill_resumes_without_publishing_twice(
    client: StackClient, state_dir: Path
) -> None:
    prefix = f"backfill-{uuid.uuid4().hex[:8]}"
    uris = upload_fixtures(client, prefix, 300)
    source = f"gs://{client.state.images_bucket}/{prefix}"
    # Small messages and a narrow in-flight window keep the first run going long enough to interrupt.
    args = (
        source,
        "--model",
        MODEL,
        "--version",
        "1",
        "--per-message",
        "8",
        "--max-in-flight",
        "32",
    )

    first = subprocess.Popen(
        _cli_argv("submit", *args, "--json"), env=_env(state_dir), cwd=REPO_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 90
    while (
        len(results_under(client, uris)) < 60
        and first.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=60)
    one = json.loads(out.strip().splitlines()[-1])
    assert first.returncode == 130, err[-2000:]
    assert one["interrupted"] and 0 < one["published_images"] < 300, one
    assert one["not_published"] == 300 - one["published_images"] - one["publish_failed"]

    code, two = submit(state_dir, *args)

    assert code == 0, two
    assert not two["interrupted"] and two["unfinished"] == 0 and two["publish_failed"] == 0
    # Everything the first run published is either stored or awaited now, never published again.
    assert two["skipped"] + two["awaited_from_earlier_runs"] == one["published_images"]
    assert one["published_images"] + two["published_images"] == 300
    stored = results_under(client, uris)
    assert len(stored) == 300 and set(stored.values()) == {"ok"}
    # Each result was produced by the run that published its object.
    run_of = {}
    for name in stored:
        body = json.loads(
            client.storage.bucket(client.state.results_bucket).blob(name).download_as_bytes()
        )
        run_of[name] = body["request_id"].split("-")[1]
    assert sorted(set(run_of.values())) == sorted({one["run_id"], two["run_id"]})
    assert list(run_of.values()).count(one["run_id"]) == one["published_images"]

    code, three = submit(state_dir, *args)
    assert (code, three["published_images"], three["skipped"]) == (0, 0, 300)
    assert not (state_dir / "backfill").exists() or not any((state_dir / "backfill").iterdir())


def test_dry_run_and_uri_list(client: StackClient, state_dir: Path, tmp_path: Path) -> None:
    prefix = f"backfill-{uuid.uuid4().hex[:8]}"
    uris = upload_fixtures(client, prefix, 6)
    source = f"gs://{client.state.images_bucket}/{prefix}"
    versions = {
        b.name.split("/")[1]
        for b in client.storage.list_blobs(client.state.models_bucket, prefix=f"{MODEL}/")
        if b.name.endswith("/config.yaml")
    }
    newest = max(versions, key=lambda v: (v.isdigit(), int(v) if v.isdigit() else 0, v))

    code, plan = submit(state_dir, source, "--model", MODEL, "--dry-run")
    assert code == 0 and plan["dry_run"]
    assert (plan["version"], plan["found"], plan["to_publish"], plan["skipped"]) == (
        newest,
        6,
        6,
        0,
    )

    missing = f"gs://{client.state.images_bucket}/{prefix}/never-uploaded.jpg"
    listing = tmp_path / "uris.txt"
    listing.write_text(
        "\n".join(
            [
                "# three of them, one bad line, one missing object",
                *uris[:3],
                "not-a-uri",
                missing,
                "",
            ]
        )
    )
    code, done = submit(state_dir, "--list", str(listing), "--model", MODEL, "--version", "1")

    assert code == 2, done  # an error result is not a failure of the backfill, but is reported
    assert (done["ok"], done["errors"], done["invalid"], done["unfinished"]) == (
        3,
        {"object_missing": 1},
        1,
        0,
    )
    assert set(results_under(client, uris)) == {
        result_name(MODEL, "1", parse_gcs_uri(u)) for u in uris[:3]
    }

    code, again = submit(state_dir, source, "--model", MODEL, "--version", "1", "--dry-run")
    assert (code, again["to_publish"], again["skipped"]) == (0, 3, 3)
    assert len(results_under(client, uris)) == 3  # the dry runs published nothing
