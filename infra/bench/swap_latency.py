"""Latency of serving across a model version swap, on a local stack of its own.

``CLIENTS`` closed-loop HTTP clients post one image each to ``POST /v1/infer``
(raw body) for ``--duration-s`` seconds; at ``--publish-at-s`` a new version of the
model (a copy of version 1 under the next number) is published to the repository:
its ``config.yaml``, the file that makes it listed, uploaded last as publishing
requires (the other files go up before the clients start).
Each replica's watcher (polling every ``--poll-s``) loads, warms and promotes it
while the clients keep going. The report compares the latency of the requests that
*started* in the swap window (``--window-s`` from the publish) with the steady state
(every other request after ``--warmup-s``): p50, p99 and p99.9, and their ratios.

    .venv/bin/python -m infra.bench.swap_latency                    # 90 s, publish at 30 s
    .venv/bin/python -m infra.bench.swap_latency --duration-s 45 --publish-at-s 15 --window-s 15
    .venv/bin/python -m infra.bench.swap_latency --replicas 2 --nodes 2   # production's shape

On several replicas the new version counts as promoted once every model replica has
logged it as its default (``/v1/stats`` answers from one replica only).

``--control`` runs the same schedule and publishes nothing: its ratios are what the
window's latency does against the rest of the run on this machine with no swap at all,
the spread any swap's ratios have to be read against.

    .venv/bin/python -m infra.bench.swap_latency --replicas 2 --nodes 2 --control

Bounded: it stops by itself after ``--duration-s`` plus the stack's start and stop.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from infra.bench.reliability_cluster import every_replica_promoted
from infra.cli.stack import default_data_plane
from infra.local.emulators import upload_tree
from infra.local.ray_cluster import DATA_PLANES
from infra.local.stack import DEFAULT_MODEL_REPOSITORY, LocalStack, StackOptions, StackState
from serve.model.repository import CONFIG_FILE

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "infra" / "samples" / "cat.jpg"
MODEL = "mobilenet_v2"
CLIENTS = 4


@dataclass(frozen=True, slots=True)
class Sample:
    """One request: when it started (seconds from the run's start), its latency, its HTTP status."""

    started_s: float
    latency_ms: float
    status: int


def percentiles(latencies_ms: Sequence[float]) -> dict[str, float | int]:
    """p50, p99 and p99.9 of ``latencies_ms`` (and how many there were)."""
    if not latencies_ms:
        return {"count": 0}
    values = np.asarray(latencies_ms, dtype=float)
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "p99_9_ms": round(float(np.percentile(values, 99.9)), 2),
    }


def split(
    samples: Sequence[Sample], warmup_s: float, swap_start_s: float, window_s: float
) -> tuple[list[float], list[float]]:
    """Latencies of successful requests: (steady state, swap window), by start time."""
    steady, swap = [], []
    for s in samples:
        if s.status != 200 or s.started_s < warmup_s:
            continue
        in_window = swap_start_s <= s.started_s < swap_start_s + window_s
        (swap if in_window else steady).append(s.latency_ms)
    return steady, swap


def summarize(
    samples: Sequence[Sample], warmup_s: float, swap_start_s: float, window_s: float,
    promoted_s: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Steady state against the swap window; with ``promoted_s``, the window split at the promotion
    (``loading``: while the new version loads and warms, ``promoted``: the rest of the window)."""
    steady, swap = split(samples, warmup_s, swap_start_s, window_s)
    report: dict[str, Any] = {
        "steady": percentiles(steady),
        "swap_window": percentiles(swap),
        "failed_requests": sum(1 for s in samples if s.status != 200),
    }
    if promoted_s is not None:
        _, loading = split(samples, warmup_s, swap_start_s, promoted_s - swap_start_s)
        _, promoted = split(samples, warmup_s, promoted_s, swap_start_s + window_s - promoted_s)
        report["loading"], report["promoted"] = percentiles(loading), percentiles(promoted)
    if steady and swap:
        for key in ("p50_ms", "p99_ms", "p99_9_ms"):
            report[f"{key.removesuffix('_ms')}_ratio"] = round(report["swap_window"][key] / report["steady"][key], 3)
    return report


def _client(url: str, body: bytes, started: float, stop: threading.Event, out: list[Sample]) -> None:
    with httpx.Client(timeout=60) as http:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status = http.post(url, content=body, headers={"content-type": "image/jpeg"}).status_code
            except httpx.HTTPError:
                status = 0
            out.append(Sample(t0 - started, (time.monotonic() - t0) * 1000, status))


def _stage_copy(state: StackState, version: str, work: Path) -> Path:
    """Upload a copy of version 1 as ``version``, all but its ``config.yaml``: not listed yet.

    Publishing puts the config last (docs/models-and-engines.md), so the replicas see the
    version only once its config lands; uploading the rest beforehand keeps the uploader's
    own work (this process, beside the clients) out of the swap window.
    Returns the folder holding the config, for :func:`_publish`.
    """
    files, config = work / "files", work / "config"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY / MODEL / "1", files / MODEL / version)
    (config / MODEL / version).mkdir(parents=True)
    (files / MODEL / version / CONFIG_FILE).rename(config / MODEL / version / CONFIG_FILE)
    upload_tree(state.client_env(), files, state.models_bucket)
    return config


def _publish(state: StackState, config: Path) -> None:
    upload_tree(state.client_env(), config, state.models_bucket)


def _default_version(state: StackState) -> str | None:
    try:
        return httpx.get(f"{state.serve_url}/v1/stats", timeout=10).json()[MODEL]["default_version"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def _promoted_everywhere(state: StackState, version: str) -> bool:
    if state.replicas == 1:
        return _default_version(state) == version
    return every_replica_promoted(state, version)


def run(args: argparse.Namespace) -> dict[str, Any]:
    progress = (lambda m: None) if args.json else (lambda m: sys.stderr.write(f"... {m}\n"))
    work = Path(tempfile.mkdtemp(prefix="triggerfish-swap-"))
    stack = LocalStack(StackOptions(
        state_dir=work / "stack",
        extra_env={"TRIGGERFISH_REPOSITORY_POLL_S": str(args.poll_s)},
        replicas=args.replicas, nodes=args.nodes, data_plane=args.data_plane,
    ))  # fmt: skip
    state = stack.start(progress=progress)
    try:
        url = f"{state.serve_url}/v1/infer"
        body = SAMPLE.read_bytes()
        for _ in range(5):  # first calls pay connection set-up and lazy initialisation
            httpx.post(url, content=body, headers={"content-type": "image/jpeg"}, timeout=120)
        before = _default_version(state)
        new_version = None if args.control else str(int(before or "1") + 1)
        config = None if new_version is None else _stage_copy(state, new_version, work / "repository")
        samples: list[Sample] = []
        stop = threading.Event()
        started = time.monotonic()
        threads = [
            threading.Thread(target=_client, args=(url, body, started, stop, samples), daemon=True)
            for _ in range(args.clients)
        ]
        for t in threads:
            t.start()
        what = "nothing (control)" if new_version is None else f"version {new_version}"
        progress(f"{args.clients} clients for {args.duration_s:.0f}s; {what} published at {args.publish_at_s:.0f}s")
        time.sleep(args.publish_at_s)
        published_s = time.monotonic() - started
        if config is not None:
            _publish(state, config)
        promoted_s = None
        while time.monotonic() - started < args.duration_s:
            if new_version is not None and promoted_s is None and _promoted_everywhere(state, new_version):
                promoted_s = time.monotonic() - started
            time.sleep(0.25)
        stop.set()
        for t in threads:
            t.join(timeout=70)
    finally:
        progress("stopping the local stack")
        stack.stop()
        shutil.rmtree(work, ignore_errors=True)
    report = summarize(samples, args.warmup_s, published_s, args.window_s, promoted_s)
    report.update(
        clients=args.clients, duration_s=args.duration_s, published_at_s=round(published_s, 2),
        promoted_after_s=round(promoted_s - published_s, 2) if promoted_s is not None else None,
        window_s=args.window_s, versions=[before, new_version], control=args.control,
        shape={"replicas": args.replicas, "nodes": args.nodes, "data_plane": args.data_plane},
    )  # fmt: skip
    return report


def format_report(r: dict[str, Any]) -> str:
    def row(name: str, p: dict[str, Any]) -> str:
        if not p.get("count"):
            return f"  {name:<12} no requests"
        return f"  {name:<12} n={p['count']:<6} p50 {p['p50_ms']:7.1f}  p99 {p['p99_ms']:7.1f}  p99.9 {p['p99_9_ms']:7.1f} ms"

    if r.get("control"):
        head = f"no version published (control), the window from {r['published_at_s']:.1f}s"
    else:
        promoted = "never" if r["promoted_after_s"] is None else f"{r['promoted_after_s']:.1f}s after publishing"
        head = f"version {r['versions'][1]} published at {r['published_at_s']:.1f}s, default {promoted}"
    lines = [
        f"swap latency: {r['clients']} clients, {r['duration_s']:.0f}s, {head}",
        row("steady", r["steady"]),
        row(f"swap {r['window_s']:.0f}s", r["swap_window"]),
    ]
    if "loading" in r:
        lines += [row("  loading", r["loading"]), row("  promoted", r["promoted"])]
    if "p99_ratio" in r:
        lines.append(f"  swap/steady: p50 {r['p50_ratio']:.2f}x  p99 {r['p99_ratio']:.2f}x  p99.9 {r['p99_9_ratio']:.2f}x")
    lines.append(f"  failed requests: {r['failed_requests']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=90.0, help="how long the clients run (default 90)")
    parser.add_argument("--publish-at-s", type=float, default=30.0, help="when the new version is published")
    parser.add_argument("--window-s", type=float, default=30.0, help="length of the swap window from the publish")
    parser.add_argument("--warmup-s", type=float, default=3.0, help="requests started before this are left out")
    parser.add_argument("--clients", type=int, default=CLIENTS, help=f"closed-loop clients (default {CLIENTS})")
    parser.add_argument("--poll-s", type=float, default=2.0, help="the replicas' repository poll interval")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of every deployment (default 1)")
    parser.add_argument("--nodes", type=int, default=1, help="Ray nodes on this machine (default 1)")
    parser.add_argument("--data-plane", choices=DATA_PLANES, default=None,
                        help="default: direct on one node, haproxy (the cloud's) on several")  # fmt: skip
    parser.add_argument("--control", action="store_true",
                        help="publish nothing: the same schedule's ratios with no swap")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args(argv)
    args.data_plane = default_data_plane(args.data_plane, args.nodes)
    if not 0 < args.publish_at_s < args.duration_s:
        parser.error(f"--publish-at-s must be within (0, {args.duration_s}), got {args.publish_at_s}")
    if args.clients < 1:
        parser.error(f"--clients must be >= 1, got {args.clients}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    sys.stdout.write((json.dumps(report) if args.json else format_report(report)) + "\n")
    return 0 if report["control"] or report["promoted_after_s"] is not None else 1


if __name__ == "__main__":
    sys.exit(main())
