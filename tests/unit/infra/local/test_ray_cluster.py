"""The local Ray cluster's shape: ports and environment per node, replicas' placement."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from infra.local.processes import start_process, stop_group
from infra.local.ray_cluster import (
    ClusterSnapshot,
    NodePorts,
    Replica,
    ingress_port_span,
    node_env,
    node_index,
    node_resource,
    replica_processes,
    replicas_per_node,
    worker_argv,
)

PORTS = NodePorts(ingress_http=20000, ingress_grpc=21000, span=4, proxy=22000,
                  haproxy_stats=23000, haproxy_metrics=23001, agent=24000, metrics_export=25000)  # fmt: skip


def test_replicas_spread_evenly_over_the_nodes() -> None:
    assert replicas_per_node(1, 1) == 1
    assert replicas_per_node(2, 2) == 1
    assert replicas_per_node(3, 2) == 2
    with pytest.raises(ValueError, match="got 0 and 2"):
        replicas_per_node(0, 2)


def test_one_node_keeps_one_port_per_replica_and_several_nodes_get_spare_ports() -> None:
    # One machine: a replica whose port another node's replica holds takes the next one.
    assert ingress_port_span(1, 1) == 1
    assert ingress_port_span(2, 1) == 2
    assert ingress_port_span(2, 2) == 4


def test_the_direct_data_plane_pins_the_ingress_ranges(tmp_path: Path) -> None:
    env = node_env("direct", PORTS, head=True, runtime_dir=tmp_path)

    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("20000", "20004")
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) == ("21000", "21004")
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in env
    # The head's proxy port is the stack's own; only a worker node is moved off it.
    assert "RAY_SERVE_WORKER_PROXY_HTTP_PORT" not in env
    assert node_env("direct", PORTS, head=False, runtime_dir=tmp_path)["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] == "22000"


def test_the_haproxy_data_plane_keeps_every_node_s_ports_and_files_apart(tmp_path: Path) -> None:
    env = node_env("haproxy", PORTS, head=False, runtime_dir=tmp_path)

    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1", "HAProxy sits in front of direct-ingress replicas"
    assert (env["RAY_SERVE_HAPROXY_STATS_PORT"], env["RAY_SERVE_HAPROXY_METRICS_PORT"]) == ("23000", "23001")
    assert env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] == "22000"
    for key in ("CONFIG_FILE_LOC", "SOCKET_PATH", "SERVER_STATE_BASE", "SERVER_STATE_FILE", "METRICS_SOCKET_PATH"):
        assert env[f"RAY_SERVE_HAPROXY_{key}"].startswith(str(tmp_path)), key


def test_the_proxy_data_plane_sets_no_direct_ingress(tmp_path: Path) -> None:
    assert "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in node_env("proxy", PORTS, head=True, runtime_dir=tmp_path)
    with pytest.raises(ValueError, match="'nginx'"):
        node_env("nginx", PORTS, head=True, runtime_dir=tmp_path)


def test_a_worker_node_joins_in_the_foreground_with_its_own_resource_and_ports(tmp_path: Path) -> None:
    argv = worker_argv("127.0.0.1:6380", 2, PORTS, num_cpus=2, temp_dir=tmp_path)

    assert argv[:5] == [sys.executable, "-m", "ray.scripts.scripts", "start", "--block"]
    assert "--address=127.0.0.1:6380" in argv
    resources = json.loads(next(a for a in argv if a.startswith("--resources=")).split("=", 1)[1])
    assert resources == {node_resource(2): 1}
    assert "--dashboard-agent-listen-port=24000" in argv
    assert "--metrics-export-port=25000" in argv
    assert f"--temp-dir={tmp_path}" in argv


def test_a_node_is_named_by_its_resource() -> None:
    assert node_index({"CPU": 2.0, "triggerfish_node_3": 1.0}) == 3
    assert node_index({"CPU": 2.0, "triggerfish_node_x": 1.0}) is None


def test_the_snapshot_round_trips_and_lists_deployments_at_zero(tmp_path: Path) -> None:
    snapshot = ClusterSnapshot(
        nodes={0: True, 1: False},
        replicas=[Replica("Ingress", 0, 11), Replica("Model_a", 1, 12), Replica("Model_a", 0, 13)],
        deployments=["Ingress", "Model_a", "Model_c"],
    )
    path = tmp_path / "replicas.json"
    snapshot.save(path)

    loaded = ClusterSnapshot.load(path)

    assert loaded is not None and loaded.nodes == {0: True, 1: False}
    grouped = loaded.by_deployment(["Model_b"])
    assert [r.node for r in grouped["Model_a"]] == [1, 0]
    assert grouped["Model_b"] == [] and grouped["Model_c"] == [], "a deployment at zero is listed"
    assert ClusterSnapshot.load(tmp_path / "missing.json") is None


def test_replica_processes_are_found_by_process_title_within_the_given_sessions(tmp_path: Path) -> None:
    # A stand-in for a Ray worker: a child that retitles itself like an actor does.
    script = (
        "import subprocess, sys, time;"
        "subprocess.Popen(['bash', '-c', 'exec -a ray::ServeReplica:triggerfish:Model_a.handle sleep 30']);"
        "subprocess.Popen(['bash', '-c', 'exec -a ray::ServeReplica:triggerfish:Model_ab sleep 30']);"
        "time.sleep(30)"
    )
    process = start_process("fake-node", [sys.executable, "-c", script], tmp_path, {"PATH": "/usr/bin:/bin"})
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(replica_processes([process.pid], "Model_ab")) < 1:
            time.sleep(0.1)
        assert len(replica_processes([process.pid], "Model_a")) == 1
        assert len(replica_processes([process.pid], "Model_ab")) == 1
        assert replica_processes([process.pid + 10_000_000], "Model_a") == []
    finally:
        stop_group(process.pid, grace_s=2)
    assert replica_processes([process.pid], "Model_a") == []
