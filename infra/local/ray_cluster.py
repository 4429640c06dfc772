"""The local Ray cluster's shape: how many nodes, which ports and resources each has, and
what runs where.

The head node is started by :mod:`infra.local.serve_host` (``ray.init``); every other
node is a worker raylet started with ``ray start --block`` in a process group of its
own, so that one node can be stopped (or killed) like a lost machine. All nodes live
on this machine, so everything a node binds (the Ingress replicas' direct ports,
Serve's per-node proxy or HAProxy, Ray's agent and metrics ports) gets a port of its
own per node. Each node carries one custom resource, ``triggerfish_node_<i>``, which
names it in ``triggerfish status`` and in the reliability runs.

Nothing here talks to Ray at import time; :func:`snapshot_replicas` runs inside a
process connected to the cluster.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from infra.local.processes import process_command_line, session_pids

NODE_RESOURCE_PREFIX = "triggerfish_node_"
# Ports Ray binds on its own (the dashboard agent's 52365 among them): never handed out.
RAY_FIXED_PORTS = frozenset({6379, 8076, 8265, 10001, 52365, 52366})
APP_NAME = "triggerfish"
DATA_PLANES = ("direct", "proxy", "haproxy")
# One merged ingress-to-model call carries up to 256 model-size images (about 38 MB
# at 224x224x3); gRPC's default 4 MB message limit would refuse it.
GRPC_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Each worker raylet's object store: the stack passes images by value, so small.
OBJECT_STORE_BYTES = 256 * 1024 * 1024


def node_resource(index: int) -> str:
    """The custom resource that marks node ``index`` (0 is the head)."""
    return f"{NODE_RESOURCE_PREFIX}{index}"


def replicas_per_node(replicas: int, nodes: int) -> int:
    """Serve's ``max_replicas_per_node`` that spreads ``replicas`` evenly over ``nodes``."""
    if replicas < 1 or nodes < 1:
        raise ValueError(f"replicas and nodes must be >= 1, got {replicas} and {nodes}")
    return math.ceil(replicas / nodes)


def ingress_port_span(replicas: int, nodes: int) -> int:
    """How many ports the Ingress replicas' direct-ingress ranges hold.

    Serve's controller hands out ports from one range per node, but every node here is
    the same machine: a replica that finds its port taken by another node's replica
    blocks that port on its node and takes the next. One port per replica, plus one per
    node for that, lets every replica (and a replacement on a restarted node) find one.
    """
    return replicas if nodes == 1 else replicas + nodes


@dataclass(frozen=True)
class NodePorts:
    """What one node binds on 127.0.0.1.

    ``ingress_http``/``ingress_grpc`` start the ranges of ``span`` ports for the Ingress
    replicas' direct HTTP and gRPC servers (the same ranges on every node, see
    :func:`ingress_port_span`). ``proxy`` is Serve's proxy (or HAProxy) on a worker
    node; the head's proxy port is the stack's own.
    """

    ingress_http: int
    ingress_grpc: int
    span: int = 1
    proxy: int = 0
    haproxy_stats: int = 0
    haproxy_metrics: int = 0
    agent: int = 0
    metrics_export: int = 0


#: Ray starts its workers at niceness 15 (``RAY_worker_niceness``), below its own daemons.
#: On the local stack the replicas share the machine's cores with the emulators and the
#: functions, stand-ins for services that have cores of their own in the cloud: at 15,
#: every one of them would run ahead of Serve. Locally the replicas run at 0, as those do.
LOCAL_WORKER_ENV = {"RAY_worker_niceness": "0"}


def direct_data_plane_env(ports: NodePorts) -> dict[str, str]:
    """Environment for Ray (set before a node starts) that selects the direct data plane.

    The ingress replicas' ports are pinned to the node's range (one port per replica
    the node may hold). A replaced ingress replica takes the same port again at once
    (no quarantine, a short drain): locally no load balancer holds on to the old one.
    """
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ports.ingress_http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ports.ingress_http + ports.span),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(ports.ingress_grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(ports.ingress_grpc + ports.span),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE_BYTES),
        # The throughput-optimized mode would send replicas' stdout/stderr, and with them
        # triggerfish's own JSON log lines, only to Serve's log files inside the node.
        "RAY_SERVE_LOG_TO_STDERR": "1",
    }


def haproxy_env(ports: NodePorts, runtime_dir: Path) -> dict[str, str]:
    """Environment that puts HAProxy (Ray's ``RAY_SERVE_ENABLE_HA_PROXY``) in front of the
    direct-ingress replicas, as on GKE.

    HAProxy's stats and metrics ports are per node (the defaults, 8404 and 9101, are
    one per machine), and its config, admin socket and state files live under
    ``runtime_dir`` (short: a Unix socket path has at most 107 bytes) instead of the
    machine-wide ``/tmp/haproxy-serve``.
    """
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_STATS_PORT": str(ports.haproxy_stats),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(ports.haproxy_metrics),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(runtime_dir / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(runtime_dir / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(runtime_dir),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(runtime_dir / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(runtime_dir / "metrics.sock"),
    }


def node_env(data_plane: str, ports: NodePorts, head: bool, runtime_dir: Path) -> dict[str, str]:
    """The Ray environment of one node for ``data_plane`` (``direct``, ``proxy`` or ``haproxy``)."""
    if data_plane not in DATA_PLANES:
        raise ValueError(f"data plane must be one of {DATA_PLANES}, got {data_plane!r}")
    env: dict[str, str] = {}
    if data_plane in ("direct", "haproxy"):
        env.update(direct_data_plane_env(ports))
    if data_plane == "haproxy":
        env.update(haproxy_env(ports, runtime_dir))
    if not head and ports.proxy:
        # Serve starts its proxy (or HAProxy) on every node; on one machine each needs its port.
        env["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] = str(ports.proxy)
    return env


def worker_argv(address: str, index: int, ports: NodePorts, num_cpus: int, temp_dir: Path) -> list[str]:
    """``ray start`` for worker node ``index``, in the foreground (``--block``) so that the
    stack owns its process group; ``temp_dir`` is the head's (private: see serve_host)."""
    return [
        sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
        f"--address={address}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--resources={json.dumps({node_resource(index): 1})}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        f"--dashboard-agent-listen-port={ports.agent}",
        f"--metrics-export-port={ports.metrics_export}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]  # fmt: skip


# -- replicas --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replica:
    """One running Serve replica: its deployment, the node it runs on and its process."""

    deployment: str
    node: int | None
    pid: int | None
    state: str = "ALIVE"


@dataclass
class ClusterSnapshot:
    """What ``serve_host`` publishes about the cluster (``<state_dir>/replicas.json``)."""

    nodes: dict[int, bool] = field(default_factory=dict)  # index -> alive
    replicas: list[Replica] = field(default_factory=list)
    taken_at: float = field(default_factory=time.time)
    # Every deployment of the application, those at zero replicas included.
    deployments: list[str] = field(default_factory=list)

    def by_deployment(self, deployments: Iterable[str] = ()) -> dict[str, list[Replica]]:
        """Running replicas per deployment; every deployment (and name in ``deployments``)
        appears, even at zero."""
        grouped: dict[str, list[Replica]] = {name: [] for name in [*self.deployments, *deployments]}
        for replica in self.replicas:
            grouped.setdefault(replica.deployment, []).append(replica)
        return grouped

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        body = {"nodes": {str(k): v for k, v in self.nodes.items()}, "deployments": self.deployments,
                "replicas": [asdict(r) for r in self.replicas], "taken_at": self.taken_at}  # fmt: skip
        tmp.write_text(json.dumps(body, indent=1))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ClusterSnapshot | None:
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls(
            nodes={int(k): bool(v) for k, v in body.get("nodes", {}).items()},
            replicas=[Replica(**r) for r in body.get("replicas", [])],
            taken_at=float(body.get("taken_at", 0.0)),
            deployments=[str(d) for d in body.get("deployments", [])],
        )


def node_index(resources: Mapping[str, Any]) -> int | None:
    """The index a node was given through its ``triggerfish_node_<i>`` resource."""
    for key in resources:
        if key.startswith(NODE_RESOURCE_PREFIX) and key[len(NODE_RESOURCE_PREFIX) :].isdigit():
            return int(key[len(NODE_RESOURCE_PREFIX) :])
    return None


def snapshot_replicas(deployments: Iterable[str] = (), app: str = APP_NAME) -> ClusterSnapshot:
    """The cluster's nodes and ``app``'s live replicas (of ``deployments`` and any other),
    read from Ray's control store.

    Needs a connected Ray driver; reads only the GCS (no dashboard, which the local
    stack does not run).
    """
    import ray
    from ray._private import state as ray_state

    nodes: dict[str, int | None] = {}
    alive: dict[int, bool] = {}
    for node in ray.nodes():
        index = node_index(node.get("Resources") or {})
        nodes[node["NodeID"]] = index
        if index is not None:
            alive[index] = alive.get(index, False) or bool(node.get("Alive"))
    prefix = f"ServeReplica:{app}:"
    replicas = []
    for actor in ray_state.actors(actor_state_name="ALIVE").values():
        name = actor.get("ActorClassName", "")
        if not name.startswith(prefix):
            continue
        node_id = (actor.get("Address") or {}).get("NodeID", "")
        replicas.append(Replica(name[len(prefix) :], nodes.get(node_id), actor.get("Pid") or None))
    replicas.sort(key=lambda r: (r.deployment, r.node if r.node is not None else -1))
    return ClusterSnapshot(alive, replicas, deployments=sorted(deployments))


def replica_processes(sessions: Iterable[int], deployment: str, app: str = APP_NAME) -> list[int]:
    """Processes of ``deployment``'s replicas among the given sessions (the stack's Ray nodes).

    A Ray actor's process title is ``ray::ServeReplica:<app>:<deployment>``; counting
    processes (not Serve's view) is what shows that a model scaled to zero really
    freed its memory.
    """
    title = f"ServeReplica:{app}:{deployment}"
    found = []
    for sid in sessions:
        for pid in session_pids(sid):
            word = process_command_line(pid).split(" ", 1)[0]
            # "ray::<title>", or "ray::<title>.<method>" while the actor runs a method.
            if word == f"ray::{title}" or word.startswith(f"ray::{title}."):
                found.append(pid)
    return sorted(found)
