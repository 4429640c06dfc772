"""Where ``submit``, ``dlq`` and ``results`` act: the local stack's emulators, or a real project.

The local stack is found through its state file, like the other client
commands. A real project is chosen by any of ``--project``, ``--terraform-dir``,
``--topic`` or ``--results-bucket``; names missing from the flags come from
``terraform output -json`` and credentials from Application Default Credentials.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.footprint import load_footprint
from infra.local.stack import DEFAULT_STATE_DIR, StackState


class TargetError(RuntimeError):
    """The target project, topic or bucket cannot be determined."""


@dataclass(frozen=True, slots=True)
class Target:
    """The names and clients one command works with.

    Attributes:
        project: Project id (``triggerfish-local`` on the local stack).
        requests_topic: Topic that request messages are published to.
        bulk_topic: Topic for bulk work (``submit``, ``dlq replay``); empty when unknown.
        serve_url: Serve's address where this machine can reach it (the local stack), for
            ``submit``'s pacing; empty otherwise.
        results_bucket: Bucket holding result JSON.
        models_repository: ``gs://bucket[/prefix]`` of the model repository.
        dead_letter_subscription: Pull subscription on the dead-letter topic.
        results_subscription: Pull subscription on the results-events topic.
        subscription_topics: Push subscription name -> its topic, used when the
            subscription itself cannot be read (deleted, or no permission).
        default_model: Model used when a command names none.
        state_dir: Where local bookkeeping (the backfill journal) is kept.
        stack: The local stack's state, or ``None`` for a real project.
    """

    project: str
    requests_topic: str
    results_bucket: str
    models_repository: str
    dead_letter_subscription: str
    results_subscription: str = ""
    subscription_topics: Mapping[str, str] = field(default_factory=dict)
    bulk_topic: str = ""
    serve_url: str = ""
    default_model: str = "mobilenet_v2"
    state_dir: Path = DEFAULT_STATE_DIR
    stack: StackState | None = None

    @property
    def local(self) -> bool:
        return self.stack is not None

    def describe(self) -> str:
        where = "local stack" if self.local else f"project {self.project}"
        topics = f"topic {self.requests_topic}" + (f" (live), {self.bulk_topic} (bulk)" if self.bulk_topic else "")
        return f"{where}: {topics}, results gs://{self.results_bucket}"

    def storage_client(self):  # noqa: ANN201 - google.cloud.storage.Client, imported lazily
        from google.cloud import storage

        if self.stack is not None:
            from google.auth.credentials import AnonymousCredentials

            return storage.Client(
                project=self.project,
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": self.stack.storage_host},
            )
        return storage.Client(project=self.project)

    def publisher_client(self, publisher_options: Any = None):  # noqa: ANN201
        from google.cloud import pubsub_v1

        self._point_pubsub_clients()
        if publisher_options is None:
            return pubsub_v1.PublisherClient()
        return pubsub_v1.PublisherClient(publisher_options=publisher_options)

    def subscriber_client(self):  # noqa: ANN201
        from google.cloud import pubsub_v1

        self._point_pubsub_clients()
        return pubsub_v1.SubscriberClient()

    def _point_pubsub_clients(self) -> None:
        # The Pub/Sub clients read the emulator address only from the environment;
        # a leftover PUBSUB_EMULATOR_HOST must not divert a real project's traffic.
        if self.stack is not None:
            os.environ["PUBSUB_EMULATOR_HOST"] = self.stack.pubsub_host
        else:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)


def state_dir() -> Path:
    return Path(os.environ.get("TRIGGERFISH_STATE_DIR", str(DEFAULT_STATE_DIR)))


def local_target(stack: StackState, directory: Path) -> Target:
    """The running local stack as a target."""
    fp = load_footprint()
    return Target(
        project=stack.project,
        requests_topic=stack.requests_topic,
        bulk_topic=stack.bulk_topic or fp.bulk_topic,
        serve_url=stack.serve_url,
        results_bucket=stack.results_bucket,
        models_repository=f"gs://{stack.models_bucket}",
        dead_letter_subscription=fp.dead_letter_subscription,
        results_subscription=fp.results_subscription,
        subscription_topics={
            **{sub.name: sub.topic for sub in fp.push_subscriptions},
        },
        default_model=stack.default_model,
        state_dir=directory,
        stack=stack,
    )


def _output(outputs: Mapping[str, Any], name: str, key: str) -> str | None:
    value = (outputs.get(name) or {}).get("value")
    if isinstance(value, Mapping) and isinstance(value.get(key), str):
        return value[key]
    return None


def cloud_target(
    outputs: Mapping[str, Any],
    project: str | None,
    *,
    topic: str | None = None,
    results_bucket: str | None = None,
    repository: str | None = None,
    dead_letter_subscription: str | None = None,
    results_subscription: str | None = None,
    directory: Path = DEFAULT_STATE_DIR,
    publishing: bool = True,
) -> Target:
    """A real project from ``terraform output -json`` (may be empty) and explicit names.

    ``publishing``: the command publishes requests and waits for their results, so the
    requests topic and the results bucket must be known (``results`` only reads events).

    Raises:
        TargetError: naming the flag that is needed when a name is known from neither.
    """
    fp = load_footprint()
    if not project:
        raise TargetError(
            "no project: give --project (or set GOOGLE_CLOUD_PROJECT, or gcloud's default)"
        )
    topic = topic or _output(outputs, "topics", "requests")
    results_bucket = results_bucket or _output(outputs, "buckets", "results")
    if publishing and not topic:
        raise TargetError("no requests topic: give --topic or --terraform-dir")
    if publishing and not results_bucket:
        raise TargetError("no results bucket: give --results-bucket or --terraform-dir")
    models = _output(outputs, "buckets", "models")
    subscriptions = (outputs.get("subscriptions") or {}).get("value") or {}
    topics = (outputs.get("topics") or {}).get("value") or {}
    mapping = {
        subscriptions[key]: topics[key]
        for key in ("requests", "uploads", "bulk")
        if key in subscriptions and key in topics
    }
    return Target(
        project=project,
        requests_topic=topic or "",
        bulk_topic=_output(outputs, "topics", "bulk") or ("" if topic != fp.requests_topic else fp.bulk_topic),
        results_bucket=results_bucket or "",
        models_repository=repository or (f"gs://{models}" if models else ""),
        dead_letter_subscription=dead_letter_subscription
        or _output(outputs, "subscriptions", "dead_letter")
        or fp.dead_letter_subscription,
        results_subscription=results_subscription
        or _output(outputs, "subscriptions", "results")
        or fp.results_subscription,
        subscription_topics=mapping
        or {
            **{sub.name: sub.topic for sub in fp.push_subscriptions},
        },
        state_dir=directory,
    )


def terraform_outputs(directory: Path) -> dict[str, Any]:
    """``terraform output -json`` of an applied configuration."""
    terraform = shutil.which("terraform")
    if terraform is None:
        raise TargetError("terraform is not installed: give --topic and --results-bucket instead")
    done = subprocess.run(
        [terraform, f"-chdir={directory}", "output", "-json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise TargetError(f"terraform output failed in {directory}: {reason}")
    try:
        outputs = json.loads(done.stdout or "{}")
    except ValueError as err:
        raise TargetError(f"terraform output in {directory} is not JSON: {err}") from err
    if not outputs:
        raise TargetError(f"terraform in {directory} has no outputs: run terraform apply first")
    return outputs


def default_project() -> str | None:
    """The project of Application Default Credentials or the environment, if any."""
    for name in ("GOOGLE_CLOUD_PROJECT", "CLOUDSDK_CORE_PROJECT"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import google.auth
        from google.auth.exceptions import DefaultCredentialsError
    except ImportError:  # pragma: no cover - google-auth comes with the Google clients
        return None
    try:
        return google.auth.default()[1]
    except DefaultCredentialsError:
        return None


def resolve_target(args: Any, *, publishing: bool = True) -> Target:
    """The target named by a command's flags: a real project, or the running local stack.

    ``publishing=False`` for a command that only reads (see :func:`cloud_target`).
    """
    directory = state_dir()
    flags = ("project", "terraform_dir", "topic", "results_bucket")
    if not any(getattr(args, name, None) for name in flags):
        target = local_target(StackState.load(directory), directory)
        if getattr(args, "repository", None):
            target = dataclasses.replace(target, models_repository=args.repository)
        return target
    outputs = (
        terraform_outputs(Path(args.terraform_dir)) if getattr(args, "terraform_dir", None) else {}
    )
    return cloud_target(
        outputs,
        getattr(args, "project", None) or default_project(),
        topic=getattr(args, "topic", None),
        results_bucket=getattr(args, "results_bucket", None),
        repository=getattr(args, "repository", None),
        dead_letter_subscription=getattr(args, "dead_letter_subscription", None),
        results_subscription=getattr(args, "subscription", None) if not publishing else None,
        directory=directory,
        publishing=publishing,
    )
