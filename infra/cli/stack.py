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
from infra.local.processes import pid_alive, stop_group
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
    stack = LocalStack(StackOptions(state_dir=state_dir, serve_port=args.serve_port))
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


def _up_detached(args: argparse.Namespace, state_dir: Path) -> int:
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / "up.log"
    argv = [sys.executable, "-m", "infra.cli.main", "up"]
    if args.serve_port:
        argv += ["--serve-port", str(args.serve_port)]
    with open(log_path, "wb") as log:
        child = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + 300
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
    (state_dir / "stack.json").unlink(missing_ok=True)
    print(json.dumps({"status": "stopped"}) if args.json else "stopped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    state = StackState.load(_state_dir())
    components = {name: pid_alive(pgid) for name, pgid in state.process_groups.items()}
    try:
        health = httpx.get(f"{state.serve_url}/healthz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        health = {"status": "unreachable"}
    report = {"supervisor_pid": state.supervisor_pid, "components": components, "serve": health,
              "serve_url": state.serve_url, "pubsub": state.pubsub_host, "storage": state.storage_host}
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
        print(f"{'metrics url':16} {state.metrics_url or '-'}")
        print(metrics_error or "\n".join(["", *_metrics_view.table(models)]))
    return 0 if all(components.values()) and health.get("status") == "ok" else 1
