"""Runs Ray and the Serve application in the foreground until SIGTERM/SIGINT.

``python -m infra.local.serve_host --port 8000 --metrics-port 8080`` — used by the local
stack; on GKE the RayService runs the same ``serve.app:build_app``.

By default Serve runs its throughput-optimized data plane (``--data-plane direct``,
Ray's ``RAY_SERVE_THROUGHPUT_OPTIMIZED``): the ingress replica serves HTTP on
``--port`` itself instead of behind Serve's proxy actor, deployments call each
other over gRPC, and request handling runs on each replica's own event loop.
Every request then skips a process hop; ``--data-plane proxy`` restores Serve's
classic proxy path (on ``--port``) for comparison. On GKE the same data plane
sits behind HAProxy (``RAY_SERVE_ENABLE_HA_PROXY``, see infra/k8s/rayservice.yaml).

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
from collections.abc import Mapping

from infra.local.processes import free_port
from shared.logging import configure_json_logging

logger = logging.getLogger("infra.local.serve_host")

# How often each Ray process reports its metrics to the node's exporter (Ray's default
# is 10 s); short, so that a scrape shows what the stack just did.
METRICS_REPORT_INTERVAL_MS = 2000
# One merged ingress-to-model call carries up to 256 model-size images (about 38 MB
# at 224x224x3); gRPC's default 4 MB message limit would refuse it.
GRPC_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def direct_data_plane_env(http_port: int, grpc_port: int) -> dict[str, str]:
    """Environment for Ray (set before it starts) that selects the direct data plane.

    The ingress replica's ports are pinned to the stack's: one replica per node
    locally, so each port range (``[MIN, MAX)``) is a single port. A replaced
    ingress replica takes the same port again at once (no quarantine, a short
    drain): locally no load balancer holds on to the old one.
    """
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_port),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_port + 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1",
        "RAY_SERVE_PORT_QUARANTINE_S": "0",
        "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_MAX_MESSAGE_BYTES),
        # The throughput-optimized mode would send replicas' stdout/stderr, and with them
        # triggerfish's own JSON log lines, only to Serve's log files inside the node.
        "RAY_SERVE_LOG_TO_STDERR": "1",
    }


def apply_env(values: Mapping[str, str]) -> None:
    """Set ``values`` unless the operator set them already (their choice wins)."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics export port")
    parser.add_argument(
        "--data-plane", choices=("direct", "proxy"), default="direct",
        help="direct: the ingress replica serves --port itself (default); proxy: Serve's proxy actor does",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-port", type=int, default=None,
        help="with --data-plane direct: where Serve's proxy (still started on the head node) listens",
    )  # fmt: skip
    args = parser.parse_args(argv)
    configure_json_logging()
    proxy_port = args.port
    if args.data_plane == "direct":
        # Serve still starts its proxy on the head node: keep it off the ingress's port.
        proxy_port = args.proxy_port or free_port()
        # Before Ray starts: its processes read these at import.
        apply_env(direct_data_plane_env(args.port, free_port()))

    import ray
    from ray import serve

    from serve.app import build_app

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        logging_level=logging.WARNING,
        log_to_driver=True,
        _metrics_export_port=args.metrics_port,
        _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
    )
    metrics_port = next((n["MetricsExportPort"] for n in ray.nodes() if n.get("Alive")), args.metrics_port)
    logger.info("metrics export", extra={"url": f"http://{args.host}:{metrics_port}/metrics"})
    try:
        serve.start(http_options={"host": args.host, "port": proxy_port})
        serve.run(build_app({}), name="triggerfish", route_prefix="/", blocking=False)
        logger.info("serve ready", extra={"url": f"http://{args.host}:{args.port}", "data_plane": args.data_plane})
        stop.wait()
    finally:
        logger.info("shutting down Serve and Ray")
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
