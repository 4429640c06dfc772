"""`make deploy-check`'s parsing and flow, against recorded command outputs (no cloud here)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from infra.packaging import deploy_check
from infra.packaging.deploy_check import CommandError

OUTPUTS = Path(__file__).with_name("deploy_check_outputs")


def _json(name):
    return json.loads((OUTPUTS / name).read_text())


@pytest.fixture
def deployment():
    return deploy_check.parse_outputs((OUTPUTS / "terraform_output.json").read_text())


def test_terraform_outputs_give_what_the_checks_compare_with(deployment):
    assert deployment.serve_address == "10.10.0.50"
    assert deployment.request_concurrency == 64 and deployment.threads == "64"
    assert deployment.function_timeout_s == {"requests": 150, "uploads": 150}
    assert deployment.functions["uploads"] == "triggerfish-on-upload"
    assert (deployment.namespace, deployment.rayservice, deployment.serve_service) == (
        "triggerfish",
        "triggerfish",
        "triggerfish-serve",
    )


def test_a_missing_output_is_named():
    raw = _json("terraform_output.json")
    del raw["deploy_check"]
    with pytest.raises(KeyError, match="deploy_check"):
        deploy_check.parse_outputs(json.dumps(raw))


def test_serve_address_is_the_reserved_one():
    service = _json("service.json")
    assert deploy_check.check_serve_address(service, "10.10.0.50").ok
    wrong = deploy_check.check_serve_address(service, "10.10.0.51")
    assert not wrong.ok and "got 10.10.0.50, reserved 10.10.0.51" in wrong.detail
    pending = copy.deepcopy(service)
    pending["status"] = {"loadBalancer": {}}
    assert not deploy_check.check_serve_address(pending, "10.10.0.50").ok


def test_rayservice_ready_condition():
    rayservice = _json("rayservice.json")
    check = deploy_check.check_rayservice_ready(rayservice)
    assert check.ok and "NonZeroServeEndpoints" in check.detail
    rayservice["status"]["conditions"][0].update(status="False", reason="ZeroServeEndpoints")
    assert not deploy_check.check_rayservice_ready(rayservice).ok
    assert not deploy_check.check_rayservice_ready({"metadata": {"name": "x"}}).ok


def test_function_concurrency_threads_and_timeout():
    function = _json("function.json")
    assert deploy_check.check_function(function, 64, "64", 150).ok
    function["serviceConfig"]["environmentVariables"].pop("THREADS")
    check = deploy_check.check_function(function, 64, "64", 150)
    assert not check.ok and "THREADS None (want '64')" in check.detail
    assert "maxInstanceRequestConcurrency" not in check.detail
    function = _json("function.json")
    function["serviceConfig"]["maxInstanceRequestConcurrency"] = 4
    assert "concurrency 4 (want 64)" in deploy_check.check_function(function, 64, "64", 150).detail


def test_result_must_be_ok_from_the_default_model():
    text = (OUTPUTS / "result.json").read_text()
    check = deploy_check.check_result(text, "mobilenet_v2")
    assert check.ok and "tensorrt-fp16" in check.detail
    assert not deploy_check.check_result(text, "text_detector").ok
    error = json.loads(text)
    error.update(status="error", error={"reason": "not_an_image", "message": "bad bytes"})
    assert "not_an_image" in deploy_check.check_result(json.dumps(error), "mobilenet_v2").detail
    assert not deploy_check.check_result("<html>", "mobilenet_v2").ok
    with_source = json.loads(text) | {"engine_source": "gcs"}
    assert (
        "(engine from gcs)"
        in deploy_check.check_result(json.dumps(with_source), "mobilenet_v2").detail
    )


def test_engine_sources_from_replica_logs():
    logs = (OUTPUTS / "replica_logs.txt").read_text()
    assert deploy_check.engine_sources(logs) == {
        "mobilenet_v2/1": ["gcs"],
        "text_detector/3": ["built"],
    }
    check = deploy_check.engine_sources_check(logs)
    assert check.ok and "text_detector/3 from built" in check.detail


class FakeCloud:
    """Answers each command with a recorded output; the result appears after two polls."""

    def __init__(self, polls_before_result=2):
        self.calls = []
        self.polls_left = polls_before_result

    def __call__(self, argv):
        self.calls.append(argv)
        joined = " ".join(argv)
        if argv[0] == "terraform":
            return (OUTPUTS / "terraform_output.json").read_text()
        if "get service" in joined:
            return (OUTPUTS / "service.json").read_text()
        if "get rayservice" in joined:
            return (OUTPUTS / "rayservice.json").read_text()
        if "functions describe" in joined:
            return (OUTPUTS / "function.json").read_text()
        if "storage cat" in joined:
            if self.polls_left:
                self.polls_left -= 1
                raise CommandError("ERROR: (gcloud.storage.cat) URL matched no objects")
            return (OUTPUTS / "result.json").read_text()
        if "logs" in argv:
            return (OUTPUTS / "replica_logs.txt").read_text()
        return ""


def test_round_trip_uploads_waits_for_the_result_path_and_cleans_up(deployment):
    cloud, clock = FakeCloud(), iter(range(0, 1000, 10))
    check = deploy_check.round_trip(
        cloud, deployment, timeout_s=600, sleep=lambda s: None, clock=lambda: next(clock)
    )
    assert check.ok, check
    (upload,) = [c for c in cloud.calls if c[:3] == ["gcloud", "storage", "cp"]]
    source = upload[4]
    assert source.startswith("gs://my-project-triggerfish-images/deploy-check/")
    name = source.removeprefix("gs://my-project-triggerfish-images/")
    expected = f"gs://my-project-triggerfish-results/mobilenet_v2/my-project-triggerfish-images/{name}.json"
    cats = [c[3] for c in cloud.calls if c[:3] == ["gcloud", "storage", "cat"]]
    assert cats == [expected] * 3
    removed = [c[3] for c in cloud.calls if c[:3] == ["gcloud", "storage", "rm"]]
    assert removed == [source, expected]


def test_round_trip_gives_up_after_the_timeout(deployment):
    cloud, clock = FakeCloud(polls_before_result=10**6), iter(range(0, 10**6, 100))
    check = deploy_check.round_trip(
        cloud, deployment, timeout_s=300, sleep=lambda s: None, clock=lambda: next(clock)
    )
    assert not check.ok and "after 300s" in check.detail


def test_main_prints_one_line_per_check_and_fails_on_any(monkeypatch, capsys):
    monkeypatch.setattr(deploy_check.time, "sleep", lambda s: None)
    assert deploy_check.main(["--timeout", "3600"], run=FakeCloud()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "ok   serve address (triggerfish-serve)",
        "ok   rayservice triggerfish",
        "ok   function triggerfish-on-upload",
        "ok   function triggerfish-on-upload",
        "ok   round trip",
        "ok   engine sources",
    ]

    cloud = FakeCloud()

    def broken(argv):
        if "get rayservice" in " ".join(argv):
            raise CommandError('kubectl: rayservices.ray.io "triggerfish" not found')
        return cloud(argv)

    assert deploy_check.main(["--timeout", "3600"], run=broken) == 1
    assert "FAIL rayservice: kubectl" in capsys.readouterr().out
