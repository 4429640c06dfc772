"""infra/cli/env.py: the export lines a shell evaluates to reach the local stack."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from infra.cli.env import NAMES, export_lines, stack_environment
from infra.cli.main import main
from infra.local.stack import StackState


def _state() -> StackState:
    return StackState(
        project="triggerfish-local", pubsub_host="127.0.0.1:8085", storage_host="http://127.0.0.1:4443",
        serve_url="http://127.0.0.1:8000", request_function_url="", upload_function_url="",
        images_bucket="triggerfish-images", results_bucket="triggerfish-results", models_bucket="m",
        requests_topic="triggerfish-requests", uploads_topic="u", dead_letter_topic="d",
        default_model="mobilenet_v2", supervisor_pid=1,
    )  # fmt: skip


def test_gcloud_and_the_client_libraries_get_the_emulators_and_no_credentials() -> None:
    env = stack_environment(_state())

    assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE"] == "http://127.0.0.1:4443/"
    assert env["CLOUDSDK_API_ENDPOINT_OVERRIDES_PUBSUB"] == "http://127.0.0.1:8085/"
    assert env["CLOUDSDK_CORE_PROJECT"] == env["GOOGLE_CLOUD_PROJECT"] == "triggerfish-local"
    assert env["CLOUDSDK_AUTH_DISABLE_CREDENTIALS"] == "true"
    assert env["STORAGE_EMULATOR_HOST"] == "http://127.0.0.1:4443"
    assert env["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8085"
    assert list(env) == list(NAMES)


def test_a_shell_that_evaluates_the_lines_has_exactly_those_values() -> None:
    values = {**stack_environment(_state()), "TRIGGERFISH_SERVE_URL": "http://host:1/it's $HOME"}
    script = "\n".join(export_lines(values)) + "\nenv -0"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True, env={}).stdout
    seen = dict(item.split("=", 1) for item in out.split("\0") if "=" in item)
    assert {k: seen[k] for k in values} == values


def test_the_command_reads_the_running_stack_and_unset_undoes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _state().save(tmp_path)
    monkeypatch.setenv("TRIGGERFISH_STATE_DIR", str(tmp_path))
    monkeypatch.setattr("infra.local.stack.pid_alive", lambda pid: True)

    assert main(["env", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:8085"
    assert main(["env", "--unset"]) == 0
    assert capsys.readouterr().out.split() == ["unset", *NAMES]


def test_without_a_stack_the_command_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TRIGGERFISH_STATE_DIR", str(tmp_path))
    assert main(["env"]) == 1
    assert "the local stack is not up" in capsys.readouterr().err
