"""Runs Ray and the Serve application in the foreground until SIGTERM/SIGINT.

``python -m infra.serve_host --port 8000 --metrics-port 8080`` — used by the local
stack; on GKE the RayService runs the same ``serve.app:build_app``.

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

from shared.logging import configure_json_logging

logger = logging.getLogger("infra.serve_host")

# How often each Ray process reports its metrics to the node's exporter (Ray's default
# is 10 s); short, so that a scrape shows what the stack just did.
METRICS_REPORT_INTERVAL_MS = 2000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--metrics-port", type=int, default=None, help="Prometheus metrics export port")
    args = parser.parse_args(argv)
    configure_json_logging()

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
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app({}), name="triggerfish", route_prefix="/", blocking=False)
        logger.info("serve ready", extra={"url": f"http://{args.host}:{args.port}"})
        stop.wait()
    finally:
        logger.info("shutting down Serve and Ray")
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
