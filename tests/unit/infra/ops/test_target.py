"""infra/ops/target.py: choosing the local stack or a real project, names from Terraform's outputs."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest

from infra.local.stack import StackState
from infra.ops import target as _target
from infra.ops.target import TargetError, cloud_target, local_target, resolve_target

DATA = Path(__file__).resolve().parents[3] / "data"
OUTPUTS = json.loads((DATA / "terraform_output.json").read_text())


def args(**values: object) -> argparse.Namespace:
    names = (
        "project",
        "terraform_dir",
        "topic",
        "results_bucket",
        "repository",
        "dead_letter_subscription",
    )
    return argparse.Namespace(**{n: None for n in names} | values)


def test_names_come_from_terraform_outputs() -> None:
    target = cloud_target(OUTPUTS, "acme-ml")
    assert (target.project, target.requests_topic) == ("acme-ml", "triggerfish-requests")
    assert target.results_bucket == "acme-ml-triggerfish-results"
    assert target.models_repository == "gs://acme-ml-triggerfish-models"
    assert target.dead_letter_subscription == "triggerfish-dead-letter-pull"
    assert dict(target.subscription_topics) == {
        "triggerfish-requests-push": "triggerfish-requests",
        "triggerfish-uploads-push": "triggerfish-uploads",
    }
    assert not target.local


def test_flags_win_over_outputs_and_suffice_without_them() -> None:
    target = cloud_target(OUTPUTS, "acme-ml", topic="other", repository="gs://m/prefix")
    assert (target.requests_topic, target.models_repository) == ("other", "gs://m/prefix")
    bare = cloud_target({}, "acme-ml", topic="t", results_bucket="r")
    assert (bare.requests_topic, bare.results_bucket, bare.models_repository) == ("t", "r", "")
    assert bare.dead_letter_subscription == "triggerfish-dead-letter-pull"  # the footprint's


@pytest.mark.parametrize(
    ("project", "kwargs", "message"),
    [
        (None, {"topic": "t", "results_bucket": "r"}, "no project: give --project"),
        ("p", {"results_bucket": "r"}, "no requests topic: give --topic or --terraform-dir"),
        ("p", {"topic": "t"}, "no results bucket: give --results-bucket or --terraform-dir"),
    ],
)
def test_missing_names_say_which_flag_is_needed(project, kwargs, message) -> None:  # noqa: ANN001
    with pytest.raises(TargetError, match=message):
        cloud_target({}, project, **kwargs)


def stack_state() -> StackState:
    return StackState(
        project="triggerfish-local", pubsub_host="127.0.0.1:1", storage_host="http://127.0.0.1:2",
        serve_url="http://127.0.0.1:3", request_function_url="", upload_function_url="",
        images_bucket="triggerfish-images", results_bucket="triggerfish-results",
        models_bucket="triggerfish-models", requests_topic="triggerfish-requests",
        uploads_topic="triggerfish-uploads", dead_letter_topic="triggerfish-dead-letter",
        default_model="mobilenet_v2", supervisor_pid=os.getpid(),
    )  # fmt: skip


def test_without_project_flags_the_running_local_stack_is_the_target(
    tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    stack_state().save(tmp_path)
    monkeypatch.setenv("TRIGGERFISH_STATE_DIR", str(tmp_path))
    target = resolve_target(args())
    assert target.local and target.stack is not None
    assert (target.requests_topic, target.models_repository) == (
        "triggerfish-requests",
        "gs://triggerfish-models",
    )
    assert target.state_dir == tmp_path
    assert resolve_target(args(repository="gs://elsewhere")).models_repository == "gs://elsewhere"


def test_any_project_flag_selects_a_real_project(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("TRIGGERFISH_STATE_DIR", str(tmp_path))  # no stack there: not needed
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "from-env")
    seen = []
    monkeypatch.setattr(_target, "terraform_outputs", lambda d: seen.append(d) or OUTPUTS)
    target = resolve_target(args(terraform_dir="terraform"))
    assert (target.project, target.results_bucket, seen) == (
        "from-env",
        "acme-ml-triggerfish-results",
        [Path("terraform")],
    )
    assert resolve_target(args(project="p", topic="t", results_bucket="r")).project == "p"


def test_a_real_project_never_talks_to_an_emulator(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    cloud_target(OUTPUTS, "acme-ml")._point_pubsub_clients()
    assert "PUBSUB_EMULATOR_HOST" not in os.environ
    local_target(stack_state(), Path("."))._point_pubsub_clients()
    assert os.environ["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:1"


def test_a_reader_of_result_events_needs_only_a_project() -> None:
    """``triggerfish results`` publishes nothing: no topic or results bucket required."""
    bare = cloud_target({}, "acme-ml", publishing=False)
    assert bare.results_subscription == "triggerfish-results-events-pull"  # the footprint's
    outputs = json.loads(json.dumps(OUTPUTS))
    outputs["subscriptions"]["value"]["results"] = "custom-results-pull"
    assert (
        cloud_target(outputs, "acme-ml", publishing=False).results_subscription
        == "custom-results-pull"
    )
    flagged = cloud_target(outputs, "acme-ml", results_subscription="mine", publishing=False)
    assert flagged.results_subscription == "mine"
    with pytest.raises(TargetError, match="no requests topic"):
        cloud_target({}, "acme-ml")
