"""Result events on the real local stack: every upload's result announced once it is readable.

fake-gcs-server notifies the uploads topic of the results bucket's writes too; the push
dispatcher's filter keeps them from the upload function and its bridge republishes them
to the results topic, where ``triggerfish results`` reads them (infra/local/emulators.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from infra.bench.result_events import EventWatch
from infra.local.client import StackClient
from shared.result_events import ResultEvent, ResultKind
from shared.result_store import GENERATION_METADATA_KEY, STATUS_METADATA_KEY

pytestmark = pytest.mark.integration

UPLOADS = 50


def test_every_upload_gives_one_event_after_its_result_is_readable(client: StackClient) -> None:
    watch = EventWatch(client, prefix=f"events-{uuid.uuid4().hex[:8]}/")
    watch.upload(UPLOADS)

    watch.collect(timeout=300)

    report = watch.report()
    assert report["uploads_without_event"] == 0, report
    assert report["distinct"] >= UPLOADS, report
    assert report["duplicates_differing"] == 0, report
    assert report["events_with_another_source_generation"] == 0, report
    assert report["early_events"] == 0 and report["replacements_without_event"] == 0, report
    for seen in watch.observations:
        event = seen.event
        assert event.kind is ResultKind.RESULT and event.model == "mobilenet_v2", event
        assert event.status.value == "ok" and event.summary.top_label, event
        if seen.object_generation == event.result_generation:  # as the event describes it
            assert seen.object_metadata is not None
            assert seen.object_metadata[STATUS_METADATA_KEY] == event.status.value
            assert seen.object_metadata[GENERATION_METADATA_KEY] == event.source_generation


def test_a_consumer_started_late_catches_up_from_the_subscription(client: StackClient) -> None:
    """`triggerfish results --json` started after every result is stored gets every event."""
    watch = EventWatch(client, prefix=f"late-{uuid.uuid4().hex[:8]}/")
    watch.upload(10)
    for uri, generation in watch.uploads.items():
        client.wait_result(uri, 180, generation=generation)  # every result stored, nobody reading
    prefix = f"gs://{client.state.images_bucket}/{watch.prefix}"

    done = subprocess.run(
        [sys.executable, "-m", "infra.cli.main", "results", "--json", "--prefix", prefix],
        env={**os.environ, "TRIGGERFISH_STATE_DIR": client.state.state_dir},
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    events = [ResultEvent.model_validate_json(line) for line in done.stdout.splitlines()]
    assert {(e.source_uri, e.source_generation) for e in events} == set(watch.uploads.items())
    assert all(e.status.value == "ok" and e.summary.top_label for e in events), events
