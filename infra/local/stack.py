"""The local stack: Pub/Sub emulator, fake-gcs-server, Ray Serve and two
functions-framework processes, wired like the cloud deployment.

``LocalStack.start()`` brings everything up and writes a state file that the
CLI's client commands read; ``stop()`` stops every child process group.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from infra.footprint import Footprint, load_footprint
from infra.local import emulators as _emulators
from infra.local.processes import (
    ManagedProcess,
    free_port,
    pid_alive,
    port_open,
    start_process,
    stop_group,
    wait_until,
)

logger = logging.getLogger(__name__)

PROJECT = "triggerfish-local"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = Path(os.environ.get("TRIGGERFISH_STATE_DIR", ".triggerfish"))
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "build" / "model-repository"


RAY_FIXED_PORTS = frozenset({6379, 8076, 8265, 10001, 52365, 52366})


class StackNotRunning(RuntimeError):
    """Client commands need a running stack."""


@dataclass
class StackState:
    """What a running stack publishes about itself (``<state_dir>/stack.json``)."""

    project: str
    pubsub_host: str
    storage_host: str
    serve_url: str
    request_function_url: str
    upload_function_url: str
    images_bucket: str
    results_bucket: str
    models_bucket: str
    requests_topic: str
    uploads_topic: str
    dead_letter_topic: str
    default_model: str
    supervisor_pid: int
    process_groups: dict[str, int] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    # Prometheus text format: Ray's metrics and triggerfish's ray_triggerfish_* series.
    metrics_url: str = ""
    # The same application behind Serve's proxy actor (one more process hop than serve_url).
    serve_proxy_url: str = ""

    def client_env(self) -> dict[str, str]:
        """Environment for clients of this stack (emulator hosts, project)."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub_host,
            "STORAGE_EMULATOR_HOST": self.storage_host,
            "GOOGLE_CLOUD_PROJECT": self.project,
        }

    def save(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = state_dir / "stack.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state_dir / "stack.json")

    @classmethod
    def load(cls, state_dir: Path) -> StackState:
        path = state_dir / "stack.json"
        try:
            state = cls(**json.loads(path.read_text()))
        except FileNotFoundError as err:
            raise StackNotRunning(f"the local stack is not up (no {path}); run: triggerfish up") from err
        except (ValueError, TypeError) as err:
            raise StackNotRunning(f"unreadable stack state {path}: {err}") from err
        if not pid_alive(state.supervisor_pid):
            raise StackNotRunning(
                f"the local stack is not up (process {state.supervisor_pid} is gone); run: triggerfish up"
            )
        return state


@dataclass
class StackOptions:
    state_dir: Path = DEFAULT_STATE_DIR
    model_repository: Path = DEFAULT_MODEL_REPOSITORY
    default_model: str = "mobilenet_v2"
    serve_port: int = 0
    startup_timeout_s: float = 240.0
    extra_env: dict[str, str] = field(default_factory=dict)


class LocalStack:
    """Starts and stops the local stack's processes."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.footprint: Footprint = load_footprint()
        self.processes: list[ManagedProcess] = []
        self.state: StackState | None = None
        self._log_dir = options.state_dir / "logs"

    def start(self, progress=lambda msg: None) -> StackState:  # noqa: ANN001
        """Start every part; on any failure stop what was started and re-raise."""
        try:
            return self._start(progress)
        except BaseException:
            self.stop()
            raise

    def _start(self, progress) -> StackState:  # noqa: ANN001
        fp, opts = self.footprint, self.options
        if not (opts.model_repository / opts.default_model).is_dir():
            raise RuntimeError(
                f"model repository {opts.model_repository} lacks {opts.default_model}; run: make model"
            )
        ps_port, gcs_port = free_port(), free_port()
        serve_port = opts.serve_port or free_port()
        # Ray binds some fixed ports of its own (the dashboard agent's 52365 among them).
        metrics_port = free_port(avoid=RAY_FIXED_PORTS)
        proxy_port = free_port(avoid=RAY_FIXED_PORTS)
        req_port, up_port = free_port(), free_port()
        pubsub_host, storage_host = f"127.0.0.1:{ps_port}", f"http://127.0.0.1:{gcs_port}"
        env = {
            **os.environ,
            "PUBSUB_EMULATOR_HOST": pubsub_host,
            "STORAGE_EMULATOR_HOST": storage_host,
            "GOOGLE_CLOUD_PROJECT": PROJECT,
            "PYTHONUNBUFFERED": "1",
            "TRIGGERFISH_SERVE_URL": f"http://127.0.0.1:{serve_port}",
            "TRIGGERFISH_RESULTS_BUCKET": fp.results_bucket,
            "TRIGGERFISH_ALLOWED_BUCKETS": fp.images_bucket,
            "TRIGGERFISH_DEFAULT_MODEL": opts.default_model,
            "TRIGGERFISH_MODEL_REPOSITORY": f"gs://{fp.models_bucket}",
            "TRIGGERFISH_ENGINE_CACHE": f"gs://{fp.engine_cache_bucket}/engines",
            "TRIGGERFISH_ENGINE_CACHE_DIR": str((opts.state_dir / "engine-cache").resolve()),
            **opts.extra_env,
        }
        progress(f"starting Pub/Sub emulator on {pubsub_host}")
        pubsub = self._spawn("pubsub", _emulators.pubsub_argv(ps_port), env)
        wait_until(lambda: port_open(ps_port), 90, "the Pub/Sub emulator", pubsub)
        _emulators.create_topics(env, PROJECT, fp)

        progress(f"starting fake-gcs-server on {storage_host}")
        gcs = self._spawn(
            "fake-gcs-server", _emulators.fake_gcs_argv(gcs_port, PROJECT, fp, self._log_dir), env
        )
        wait_until(lambda: port_open(gcs_port), 30, "fake-gcs-server", gcs)
        _emulators.create_buckets(env, PROJECT, fp)
        count = _emulators.upload_tree(env, opts.model_repository, fp.models_bucket)
        progress(f"uploaded model repository ({count} files) to gs://{fp.models_bucket}")

        progress("starting Ray Serve (loads and warms up every model)")
        serve = self._spawn(
            "serve",
            [sys.executable, "-m", "infra.local.serve_host", "--port", str(serve_port), "--metrics-port", str(metrics_port),
             "--proxy-port", str(proxy_port)],  # fmt: skip
            {"TRIGGERFISH_AUTH": "off", **env},  # no ID tokens on this machine: auth off, explicitly
        )
        fn_argv = _emulators.function_argv
        fn_env = _emulators.function_env(env, fp)
        req_fn = self._spawn("fn-on-request", fn_argv("on_request", req_port), fn_env)
        up_fn = self._spawn("fn-on-upload", fn_argv("on_upload", up_port), fn_env)
        wait_until(lambda: port_open(req_port), 60, "the on_request function", req_fn)
        wait_until(lambda: port_open(up_port), 60, "the on_upload function", up_fn)
        _emulators.create_push_subscriptions(env, PROJECT, fp)
        self._spawn(
            "push-dispatcher",
            _emulators.dispatcher_argv(PROJECT, fp, {"on_request": req_port, "on_upload": up_port}),
            env,
        )
        wait_until(
            lambda: _healthy(serve_port), opts.startup_timeout_s, "Ray Serve to be ready", serve
        )
        self.state = StackState(
            project=PROJECT,
            pubsub_host=pubsub_host,
            storage_host=storage_host,
            serve_url=f"http://127.0.0.1:{serve_port}",
            serve_proxy_url=f"http://127.0.0.1:{proxy_port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            request_function_url=f"http://127.0.0.1:{req_port}",
            upload_function_url=f"http://127.0.0.1:{up_port}",
            images_bucket=fp.images_bucket,
            results_bucket=fp.results_bucket,
            models_bucket=fp.models_bucket,
            requests_topic=fp.requests_topic,
            uploads_topic=fp.uploads_topic,
            dead_letter_topic=fp.dead_letter_topic,
            default_model=opts.default_model,
            supervisor_pid=os.getpid(),
            process_groups={p.name: p.pid for p in self.processes},
        )
        self.state.save(opts.state_dir)
        return self.state

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        process = start_process(name, argv, self._log_dir, env, cwd=REPO_ROOT)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop children in reverse start order; remove the state file."""
        for process in reversed(self.processes):
            # Ray needs time to stop its workers cleanly; the others stop at once.
            stop_group(process.pid, grace_s=30.0 if process.name == "serve" else 10.0)
        self.processes.clear()
        state_file = self.options.state_dir / "stack.json"
        if self.state is not None and state_file.exists():
            state_file.unlink()
        self.state = None


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
