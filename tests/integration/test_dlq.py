"""Dead letters on the local stack: a function that keeps failing (Serve unreachable)
gets its messages dead-lettered after max_delivery_attempts; ``dlq list`` shows
them without consuming them; after the fix ``dlq replay`` republishes them and
they get results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.local import emulators as _emulators
from infra.local.client import StackClient
from infra.local.processes import free_port, port_open, start_process, stop_group, wait_until
from infra.local.stack import REPO_ROOT, StackState
from infra.ops.backfill import result_name
from infra.ops.dlq import pull_dead_letters, release
from shared.uris import parse_gcs_uri
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 5  # the footprint's, and the smallest Pub/Sub accepts


@pytest.fixture
def state_dir(stack: StackState, tmp_path: Path) -> Path:
    stack.save(tmp_path)
    return tmp_path


@pytest.fixture
def broken_function(stack: StackState, tmp_path: Path) -> Iterator[str]:
    """An on_request function whose Serve is unreachable: every delivery fails with 500."""
    port = free_port()
    env = {
        **os.environ,
        **stack.client_env(),
        "TRIGGERFISH_SERVE_URL": f"http://127.0.0.1:{free_port()}",
        "TRIGGERFISH_RESULTS_BUCKET": stack.results_bucket,
        "TRIGGERFISH_ALLOWED_BUCKETS": stack.images_bucket,
        "TRIGGERFISH_DEFAULT_MODEL": stack.default_model,
    }
    process = start_process(
        "fn-broken", _emulators.function_argv("on_request", port), tmp_path, env, REPO_ROOT
    )
    try:
        wait_until(lambda: port_open(port), 60, "the broken function", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(process.pid, grace_s=5)


def dlq(state_dir: Path, *args: str) -> tuple[int, dict]:
    done = subprocess.run(
        [sys.executable, "-m", "infra.cli.main", "dlq", *args, "--json"],
        env={**os.environ, "TRIGGERFISH_STATE_DIR": str(state_dir)},
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.stdout.strip(), done.stderr[-2000:]
    return done.returncode, json.loads(done.stdout)


def test_dead_letters_are_listed_and_replayed(
    client: StackClient, stack: StackState, state_dir: Path, broken_function: str
) -> None:
    from google.cloud import pubsub_v1

    tag = uuid.uuid4().hex[:8]
    topic_name, sub_name = f"triggerfish-dlq-test-{tag}", f"triggerfish-dlq-test-{tag}-push"
    publisher, subscriber = client.publisher, pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(stack.project, topic_name)
    subscription = subscriber.subscription_path(stack.project, sub_name)
    path = f"/projects/{stack.project}/topics/{topic_name}"
    publisher.create_topic(name=topic)
    # The footprint's dead-letter policy; no retry policy, so the emulator retries every
    # second instead of spacing the attempts out over a minute and a half.
    subscriber.create_subscription(
        request={
            "name": subscription,
            "topic": topic,
            "push_config": {"push_endpoint": broken_function + path},
            "ack_deadline_seconds": 30,
            "dead_letter_policy": {
                "dead_letter_topic": publisher.topic_path(stack.project, stack.dead_letter_topic),
                "max_delivery_attempts": MAX_ATTEMPTS,
            },
        }
    )
    try:
        uris = []
        for i in range(3):
            uri, _ = client.upload(
                SAMPLES / "coffee.jpg", name=f"dlq-{tag}/{i}.jpg", model="backfill-fixture"
            )
            uris.append(str(uri))
        bodies = {
            json.dumps(
                {"uri": u, "model": "mobilenet_v2", "version": "1", "request_id": f"dlq-{tag}-{i}"}
            )
            for i, u in enumerate(uris)
        }
        for body in bodies:
            publisher.publish(topic, body.encode(), origin="test").result(timeout=30)
        # A dead letter from another subscription, which --from must leave alone.
        decoy = publisher.publish(
            publisher.topic_path(stack.project, stack.dead_letter_topic), b"{}",
            CloudPubSubDeadLetterSourceSubscription=f"elsewhere-{tag}",
        ).result(timeout=30)  # fmt: skip

        ours: list[dict] = []
        deadline = time.monotonic() + 60
        while len(ours) < 3 and time.monotonic() < deadline:
            time.sleep(1)
            _, listed = dlq(state_dir, "list", "--from", sub_name)
            ours = listed["messages"]

        assert {m["body"] for m in ours} == bodies
        assert all(m["delivery_attempts"] == MAX_ATTEMPTS for m in ours)
        assert all(m["source_project"] == stack.project and m["age_s"] >= 0 for m in ours)
        assert all(m["attributes"] == {"origin": "test"} for m in ours)
        _, again = dlq(state_dir, "list")  # listing consumed nothing
        assert {m["message_id"] for m in ours} <= {m["message_id"] for m in again["messages"]}

        # The fix: deliveries go to the working function from now on.
        subscriber.modify_push_config(
            subscription=subscription,
            push_config={"push_endpoint": stack.request_function_url + path},
        )
        _, everything = dlq(state_dir, "list")
        code, replayed = dlq(state_dir, "replay", "--from", sub_name)
        assert code == 0 and set(replayed["replayed"]) == {m["message_id"] for m in ours}, replayed

        names = [result_name("mobilenet_v2", "1", parse_gcs_uri(u)) for u in uris]
        bucket = client.storage.bucket(stack.results_bucket)
        deadline = time.monotonic() + 60
        while not all(bucket.get_blob(n) for n in names) and time.monotonic() < deadline:
            time.sleep(0.5)
        results = [json.loads(bucket.blob(n).download_as_bytes()) for n in names]
        assert [r["status"] for r in results] == ["ok"] * 3
        assert {r["request_id"] for r in results} == {f"dlq-{tag}-{i}" for i in range(3)}
        _, after = dlq(state_dir, "list")
        assert not [m for m in after["messages"] if m["source_subscription"] == sub_name]
        others = {m["message_id"] for m in everything["messages"]} - {m["message_id"] for m in ours}
        assert decoy in others and others <= {m["message_id"] for m in after["messages"]}
    finally:
        _, left = dlq(state_dir, "list", "--from", f"elsewhere-{tag}")
        if left["messages"]:  # acknowledge the decoy so that it does not outlive the test
            leased = pull_dead_letters(subscriber, left["subscription"], 1000)
            mine = [x for x in leased if x.source_subscription == f"elsewhere-{tag}"]
            subscriber.acknowledge(
                subscription=left["subscription"], ack_ids=[x.ack_id for x in mine]
            )
            release(subscriber, left["subscription"], [x for x in leased if x not in mine])
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic)
