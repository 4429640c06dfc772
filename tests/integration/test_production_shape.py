"""The local stack in production's shape: ``triggerfish up --replicas 2 --nodes 2``.

Two replicas of the Ingress and of each model, spread over a Ray head and one
``ray start`` worker raylet (one replica of each per node), with HAProxy in front as
in the cloud (the data plane ``up`` picks for several nodes). ``triggerfish status``
shows each deployment's replicas and their nodes; a message and an HTTP call
complete; ``triggerfish down`` stops every raylet and everything they started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.bench.reliability import replica_pids
from infra.bench.reliability_cluster import DEPLOYMENT, replica_promotions
from infra.local.client import StackClient
from infra.local.processes import process_command_line, session_pids
from infra.local.ray_cluster import replica_processes
from infra.local.stack import StackState
from tests.integration.conftest import SAMPLES

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOYMENTS = ("Ingress", "Model_mobilenet_v2", "Model_text_detector")


def cli(state_dir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRIGGERFISH_STATE_DIR": str(state_dir)}
    return subprocess.run(
        [sys.executable, "-m", "infra.cli.main", *args, "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def shaped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, StackState]]:
    state_dir = tmp_path_factory.mktemp("shaped-stack")
    up = cli(state_dir, "up", "--detach", "--replicas", "2", "--nodes", "2")
    assert up.returncode == 0, up.stdout + up.stderr
    state = StackState.load(state_dir)
    try:
        yield state_dir, state
    finally:
        down = cli(state_dir, "down", timeout=180)
        assert down.returncode == 0, down.stdout + down.stderr
        left = {name: [process_command_line(p)[:60] for p in session_pids(sid)]
                for name, sid in state.process_groups.items() if session_pids(sid)}  # fmt: skip
        assert not left, f"processes left after down: {left}"


def test_every_deployment_has_one_replica_on_each_node(shaped: tuple[Path, StackState]) -> None:
    _, state = shaped
    assert (state.replicas, state.nodes, state.data_plane) == (2, 2, "haproxy")
    assert set(state.ray_sessions()) == {"serve", "ray-node-1"}
    for deployment in DEPLOYMENTS:
        per_node = {name: len(replica_processes([sid], deployment)) for name, sid in state.ray_sessions().items()}
        assert per_node == {"serve": 1, "ray-node-1": 1}, (deployment, per_node)


def test_status_shows_replicas_per_model_and_their_nodes(shaped: tuple[Path, StackState]) -> None:
    state_dir, _ = shaped
    status = cli(state_dir, "status", timeout=60)

    report = json.loads(status.stdout)
    assert status.returncode == 0, status.stdout + status.stderr
    assert report["shape"] == {"replicas": 2, "nodes": 2, "scale_to_zero": False, "data_plane": "haproxy"}
    for deployment in DEPLOYMENTS:
        assert report["replicas"][deployment] == {"running": 2, "nodes": [0, 1], "processes": 2}, deployment


def test_every_model_replica_logs_its_own_default_version(shaped: tuple[Path, StackState]) -> None:
    # Both replicas promote their first version within seconds of each other: Ray merges
    # such near-identical lines from different processes unless the stack keeps them apart.
    _, state = shaped
    live = set(replica_pids(state, DEPLOYMENT))
    assert len(live) == 2, live
    assert live <= set(replica_promotions(state, None)), (live, replica_promotions(state, None))


def test_a_message_and_an_http_call_complete(shaped: tuple[Path, StackState]) -> None:
    _, state = shaped
    client = StackClient(state)
    uri, generation = client.upload(SAMPLES / "cat.jpg", name=f"shape-{uuid.uuid4().hex[:8]}.jpg")
    assert client.wait_result(str(uri), 180, generation=generation)["status"] == "ok"

    _, request_id = client.publish([str(uri)])
    assert client.wait_result(str(uri), 180, request_id=request_id)["status"] == "ok"
    answers = [client.infer(SAMPLES / "coffee.jpg")["results"][0]["status"] for _ in range(6)]
    assert answers == ["ok"] * 6


def test_replicas_on_every_node_run_at_the_stacks_priority(shaped: tuple[Path, StackState]) -> None:
    """Ray would start them at niceness 15, behind the emulators and functions sharing the cores."""
    _, state = shaped
    niceness = {
        (name, deployment): sorted({os.getpriority(os.PRIO_PROCESS, pid) for pid in replica_processes([sid], deployment)})
        for name, sid in state.ray_sessions().items()
        for deployment in DEPLOYMENTS
    }
    assert set(map(tuple, niceness.values())) == {(0,)}, niceness
