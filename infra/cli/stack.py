"""``triggerfish up | down | status``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from infra.cli import metrics_view as _metrics_view
from infra.local.processes import kill_session, pid_alive, stop_group
from infra.local.ray_cluster import ClusterSnapshot, replica_processes
from infra.local.stack import (
    DEFAULT_STATE_DIR,
    LocalStack,
    StackNotRunning,
    StackOptions,
    StackState,
)


def _state_dir() -> Path:
    return Path(os.environ.get("TRIGGERFISH_STATE_DIR", str(DEFAULT_STATE_DIR)))


def _ready_line(state: StackState, as_json: bool) -> str:
    if as_json:
        return json.dumps({"status": "ready", **{k: v for k, v in vars(state).items()}})
    return (
        f"ready serve={state.serve_url} pubsub={state.pubsub_host} storage={state.storage_host} "
        f"images=gs://{state.images_bucket} results=gs://{state.results_bucket}"
    )


def _ensure_not_running(state_dir: Path) -> None:
    try:
        state = StackState.load(state_dir)
    except StackNotRunning:
        return
    raise RuntimeError(f"the local stack is already up (pid {state.supervisor_pid}); run: triggerfish down")


def cmd_up(args: argparse.Namespace) -> int:
    state_dir = _state_dir()
    _ensure_not_running(state_dir)
    if args.detach:
        return _up_detached(args, state_dir)
    stop = threading.Event()
    # SIGTERM (from 'down' or a process manager) stops the stack like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stack = LocalStack(stack_options(args, state_dir))
    try:
        state = stack.start(progress=lambda msg: print(f"... {msg}", file=sys.stderr, flush=True))
        print(_ready_line(state, args.json), flush=True)
        while not stop.wait(1.0):
            dead = [p.name for p in stack.processes if not p.alive()]
            if dead:
                print(f"triggerfish up: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
    finally:
        print("... stopping the local stack", file=sys.stderr, flush=True)
        stack.stop()
    return 0


def stack_options(args: argparse.Namespace, state_dir: Path) -> StackOptions:
    """``triggerfish up``'s flags as the stack's options."""
    return StackOptions(
        state_dir=state_dir,
        serve_port=args.serve_port,
        replicas=getattr(args, "replicas", 1),
        nodes=getattr(args, "nodes", 1),
        scale_to_zero=getattr(args, "scale_to_zero", False),
        idle_delay_s=getattr(args, "idle_delay", 15.0),
        data_plane=default_data_plane(getattr(args, "data_plane", None), getattr(args, "nodes", 1)),
    )


def default_data_plane(chosen: str | None, nodes: int) -> str:
    """The data plane ``up`` runs: the one chosen, else direct on one node and, as in the cloud,
    HAProxy on several (whose Ingress replicas then share one address that survives a node)."""
    if chosen:
        return chosen
    return "haproxy" if nodes > 1 else "direct"


def up_argv(args: argparse.Namespace) -> list[str]:
    """The foreground ``up`` command line that a detached ``up`` runs (the same shape)."""
    argv = [sys.executable, "-m", "infra.cli.main", "up"]
    if args.serve_port:
        argv += ["--serve-port", str(args.serve_port)]
    options = stack_options(args, Path("."))
    if options.replicas != 1 or options.nodes != 1:
        argv += ["--replicas", str(options.replicas), "--nodes", str(options.nodes)]
    if options.scale_to_zero:
        argv += ["--scale-to-zero", "--idle-delay", str(options.idle_delay_s)]
    if getattr(args, "data_plane", None):
        argv += ["--data-plane", options.data_plane]
    return argv


def _up_detached(args: argparse.Namespace, state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "up.log"
    argv = up_argv(args)
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    # A cluster of several nodes starts its worker raylets and waits for every replica.
    deadline = time.monotonic() + 300 + 120 * (getattr(args, "nodes", 1) > 1)
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"the stack failed to start: {tail[0]} (log: {log_path})")
        try:
            state = StackState.load(state_dir)
            if state.supervisor_pid == child.pid:
                print(_ready_line(state, args.json), flush=True)
                return 0
        except StackNotRunning:
            pass
        time.sleep(0.5)
    stop_group(child.pid)
    raise TimeoutError(f"the stack did not become ready in 300s (log: {log_path})")


def cmd_down(args: argparse.Namespace) -> int:
    state_dir = _state_dir()
    state = StackState.load(state_dir)
    os.kill(state.supervisor_pid, signal.SIGTERM)
    deadline = time.monotonic() + 90
    while pid_alive(state.supervisor_pid) and time.monotonic() < deadline:
        time.sleep(0.3)
    if pid_alive(state.supervisor_pid):
        # The supervisor is stuck: stop its children directly, then it.
        for pgid in state.process_groups.values():
            stop_group(pgid, grace_s=5)
        stop_group(state.supervisor_pid, grace_s=5)
    # Whatever a child left in its session (a worker raylet's workers, the HAProxy that
    # Serve started) goes too: nothing of the stack outlives 'down'.
    for pgid in state.process_groups.values():
        kill_session(pgid)
    (state_dir / "stack.json").unlink(missing_ok=True)
    print(json.dumps({"status": "stopped"}) if args.json else "stopped")
    return 0


def replica_report(state: StackState) -> dict[str, dict]:
    """Replicas per deployment: Serve's running replicas and their nodes (from the placement
    serve_host publishes) and the replica processes found on this machine."""
    snapshot = state.cluster() or ClusterSnapshot()
    sessions = list(state.ray_sessions().values())
    report = {}
    for deployment, replicas in sorted(snapshot.by_deployment().items()):
        report[deployment] = {
            "running": len(replicas),
            "nodes": sorted(r.node for r in replicas if r.node is not None),
            "processes": len(replica_processes(sessions, deployment)),
        }
    return report


def _serve_health(state: StackState) -> dict:
    # /healthz asks every model for its stats, which would wake a model scaled to zero:
    # a stack that scales to zero is asked only whether the Ingress answers.
    path = "/v2/health/live" if state.scale_to_zero else "/healthz"
    try:
        response = httpx.get(f"{state.serve_url}{path}", timeout=5)
    except httpx.HTTPError:
        return {"status": "unreachable"}
    if state.scale_to_zero:
        return {"status": "ok" if response.status_code == 200 else "unavailable", "models": "scale to zero"}
    try:
        return response.json()
    except ValueError:
        return {"status": "unreachable"}


def cmd_status(args: argparse.Namespace) -> int:
    state = StackState.load(_state_dir())
    components = {name: pid_alive(pgid) for name, pgid in state.process_groups.items()}
    health = _serve_health(state)
    replicas = replica_report(state)
    report = {"supervisor_pid": state.supervisor_pid, "components": components, "serve": health,
              "serve_url": state.serve_url, "pubsub": state.pubsub_host, "storage": state.storage_host,
              "shape": {"replicas": state.replicas, "nodes": state.nodes, "scale_to_zero": state.scale_to_zero,
                        "data_plane": state.data_plane},
              "replicas": replicas}  # fmt: skip
    models, metrics_error = {}, None
    if state.metrics_url:
        try:
            models = _metrics_view.model_figures(state.metrics_url, _state_dir(), state.started_at)
        except httpx.HTTPError as err:
            metrics_error = f"metrics unreachable at {state.metrics_url}: {err}"
    report.update(metrics_url=state.metrics_url, models=_metrics_view.as_json(models), metrics_error=metrics_error)
    if args.json:
        print(json.dumps(report))
    else:
        for name, alive in components.items():
            print(f"{name:16} {'running' if alive else 'STOPPED'}")
        print(f"{'serve health':16} {health.get('status')} models={health.get('models')}")
        print(f"{'serve url':16} {state.serve_url}")
        shape = f"{state.replicas} replica(s) x {state.nodes} node(s), data plane {state.data_plane}"
        print(f"{'shape':16} {shape}{', scale to zero' if state.scale_to_zero else ''}")
        for deployment, row in replicas.items():
            nodes = ",".join(str(n) for n in row["nodes"]) or "-"
            print(f"{deployment:22} {row['running']} running on node(s) {nodes}; {row['processes']} process(es)")
        print(f"{'metrics url':16} {state.metrics_url or '-'}")
        print(metrics_error or "\n".join(["", *_metrics_view.table(models)]))
    return 0 if all(components.values()) and health.get("status") == "ok" else 1
