"""Reading the model replicas' promotions from the Serve process's log (all nodes' replicas log there)."""

from __future__ import annotations

import json
from pathlib import Path

from infra.bench import reliability_cluster
from infra.bench.reliability_cluster import (
    RolloutReport,
    every_replica_promoted,
    replica_promotions,
    replicas_serving,
)
from infra.local.stack import StackState


def line(deployment: str, pid: int, message: str, time: str = "2026-12-02T08:00:00+00:00") -> str:
    body = json.dumps({"severity": "INFO", "time": time, "message": message})
    return f"\x1b[36m(ServeReplica:triggerfish:{deployment} pid={pid})\x1b[0m {body}"


def state_with_log(tmp_path: Path, lines: list[str], replicas: int = 2) -> StackState:
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "serve.log").write_text("\n".join(lines) + "\n")
    return StackState(
        project="p", pubsub_host="h", storage_host="s", serve_url="u", request_function_url="r",
        upload_function_url="f", images_bucket="i", results_bucket="r", models_bucket="m",
        requests_topic="t", uploads_topic="t", dead_letter_topic="d", default_model="mobilenet_v2",
        supervisor_pid=1, replicas=replicas, state_dir=str(tmp_path),
    )  # fmt: skip


def test_promotions_are_read_per_replica_pid_and_version(tmp_path: Path) -> None:
    state = state_with_log(tmp_path, [
        line("Model_mobilenet_v2", 11, "default version of mobilenet_v2: None -> 1"),
        line("Model_mobilenet_v2", 11, "default version of mobilenet_v2: 1 -> 4", "2026-12-02T08:00:05+00:00"),
        line("Model_mobilenet_v2", 12, "default version of mobilenet_v2: None -> 1"),
        line("Model_text_detector", 13, "default version of mobilenet_v2: 1 -> 4"),
        "(ServeController pid=9) default version of mobilenet_v2: 1 -> 4",
    ])  # fmt: skip

    promoted = replica_promotions(state, "4")

    assert list(promoted) == [11]
    assert promoted[11].second == 5
    assert set(replica_promotions(state, None)) == {11, 12}


def test_every_live_replica_must_have_promoted(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    state = state_with_log(tmp_path, [
        line("Model_mobilenet_v2", 11, "default version of mobilenet_v2: 1 -> 4"),
        line("Model_mobilenet_v2", 12, "default version of mobilenet_v2: None -> 1"),
    ])  # fmt: skip
    monkeypatch.setattr(reliability_cluster, "replica_pids", lambda state, name: [11, 12])
    assert not every_replica_promoted(state, "4")
    assert replicas_serving(state)
    monkeypatch.setattr(reliability_cluster, "replica_pids", lambda state, name: [11])
    assert every_replica_promoted(state, "4")
    assert not replicas_serving(state), "one replica short of the deployment's two"


def test_a_rollout_counts_three_polls_from_the_end_of_its_upload() -> None:
    report = RolloutReport(10, version="4", poll_s=2.0, upload_s=8.0, promotions_s={11: 3.0, 12: 13.9})
    assert report.promoted_in_time  # one replica promoted while the upload was still running
    report.promotions_s[12] = 14.5
    assert not report.promoted_in_time
    report.promotions_s[12] = float("inf")  # never
    assert not report.promoted_in_time
