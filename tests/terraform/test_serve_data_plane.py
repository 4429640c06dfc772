"""Serve's data plane on GKE: HAProxy on every Ray pod, direct ingress, gRPC between deployments.

Checked on the RayService as modules/ray-manifests renders it (the real terraform binary,
offline), and on the image that must carry the HAProxy binary.
"""

from __future__ import annotations

import yaml

from tests.terraform._render import render

#: Set on the head and on every worker group's containers: Serve reads them at import, in every
#: Ray process (controller, proxy, replicas), so a pod without them would run another data plane.
DATA_PLANE_ENV = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": "268435456",
    "RAY_SERVE_LOG_TO_STDERR": "1",
}

#: What one merged Ingress -> Model call carries at most: 256 images of 224x224x3 uint8.
MERGED_CALL_BYTES = 256 * 224 * 224 * 3


def _cluster():
    return yaml.safe_load(render()["rayservice"])["spec"]["rayClusterConfig"]


def _containers():
    """(group, container) for every container of the head and of every worker group."""
    cluster = _cluster()
    groups = [("head", cluster["headGroupSpec"])] + [
        (group["groupName"], group) for group in cluster["workerGroupSpecs"]
    ]
    return [
        (name, container)
        for name, group in groups
        for container in group["template"]["spec"]["containers"]
    ]


def test_every_ray_container_runs_the_haproxy_data_plane():
    containers = _containers()
    groups = {name for name, _ in containers}
    assert {"head", "cpu", "gpu"} <= groups, groups
    for name, container in containers:
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        for key, value in DATA_PLANE_ENV.items():
            assert env.get(key) == value, f"{name}/{container['name']}: {key}={env.get(key)!r}"


def test_grpc_message_limit_holds_a_merged_call():
    limit = int(DATA_PLANE_ENV["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"])
    assert limit >= MERGED_CALL_BYTES
    assert limit > 4 * 1024 * 1024  # gRPC's default


def test_haproxy_listens_on_the_port_the_serve_service_and_pods_expose():
    rayservice = yaml.safe_load(render()["rayservice"])
    serve_config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["port"] == 8000
    (port,) = rayservice["spec"]["serveService"]["spec"]["ports"]
    assert port["port"] == port["targetPort"] == 8000
    for name, container in _containers():
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["serve"] == 8000, f"{name}/{container['name']}"


def test_network_policy_admits_every_port_between_the_namespaces_pods():
    """HAProxy reaches the Ingress replicas' HTTP ports (30000-31000) on other pods, and
    deployments call each other over gRPC (40000-41000): an intra-namespace rule without a
    port list admits both ranges."""
    policy = yaml.safe_load(render()["documents"]["networkpolicy"])
    assert policy["spec"]["podSelector"] == {}
    assert {"from": [{"podSelector": {}}]} in policy["spec"]["ingress"]
