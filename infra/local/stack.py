"""The local stack: Pub/Sub emulator, fake-gcs-server, Ray Serve and two
functions-framework processes, wired like the cloud deployment.

``LocalStack.start()`` brings everything up and writes a state file that the
CLI's client commands read; ``stop()`` stops every child process group.

By default Ray is one node with one replica of every deployment. ``StackOptions``
gives production's shape instead: ``replicas`` of the Ingress and of every model,
spread over ``nodes`` Ray nodes on this machine (the head plus worker raylets
started with ``ray start``, see :mod:`infra.local.ray_cluster`), HAProxy in front
(``data_plane="haproxy"``), and model deployments that scale to zero when idle
(``scale_to_zero``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from infra.footprint import Footprint, load_footprint
from infra.local import emulators as _emulators
from infra.local.processes import (
    ManagedProcess,
    free_port,
    free_port_block,
    kill_session,
    pid_alive,
    port_open,
    session_pids,
    start_process,
    stop_group,
    wait_until,
)
from infra.local.ray_cluster import (
    DATA_PLANES,
    LOCAL_WORKER_ENV,
    RAY_FIXED_PORTS,
    ClusterSnapshot,
    NodePorts,
    ingress_port_span,
    node_env,
    worker_argv,
)

logger = logging.getLogger(__name__)

PROJECT = "triggerfish-local"
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_STATE_DIR = Path(os.environ.get("TRIGGERFISH_STATE_DIR", ".triggerfish"))
DEFAULT_MODEL_REPOSITORY = REPO_ROOT / "build" / "model-repository"


# Process-group names of the worker raylets: ray-node-1, ray-node-2, ... (the head runs in "serve").
WORKER_NODE_PREFIX = "ray-node-"
REPLICAS_FILE = "replicas.json"
ADDRESS_FILE = "ray-address"


class StackNotRunning(RuntimeError):
    """Client commands need a running stack."""


#: How the bulk function's process is started: niceness 10 (``nice`` execs the command, same pid).
BULK_NICE_ARGV = ["nice", "-n", "10"]


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
    # The cluster's shape (see StackOptions) and where serve_host publishes its replicas.
    replicas: int = 1
    nodes: int = 1
    scale_to_zero: bool = False
    data_plane: str = "direct"
    state_dir: str = ""
    # Bulk work (submit, dlq replay) and result events (one per stored result).
    bulk_function_url: str = ""
    bulk_topic: str = ""
    results_topic: str = ""

    def ray_sessions(self) -> dict[str, int]:
        """The Ray nodes' process sessions by name: ``serve`` (the head) and ``ray-node-<i>``."""
        return {
            name: pgid for name, pgid in self.process_groups.items()
            if name == "serve" or name.startswith(WORKER_NODE_PREFIX)
        }  # fmt: skip

    def cluster(self) -> ClusterSnapshot | None:
        """The replicas' placement as serve_host last published it (every 2 s), if any."""
        return ClusterSnapshot.load(Path(self.state_dir) / REPLICAS_FILE) if self.state_dir else None

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
    # The production shape: replicas of every deployment (the Ingress included) over a Ray
    # cluster of `nodes` nodes on this machine (the head plus `ray start` worker raylets).
    replicas: int = 1
    nodes: int = 1
    # Model deployments scale to zero replicas after `idle_delay_s` without calls.
    scale_to_zero: bool = False
    idle_delay_s: float = 15.0
    # direct (default), proxy (Serve's proxy actor) or haproxy (the cloud's: HAProxy in front
    # of the direct-ingress replicas).
    data_plane: str = "direct"
    # TRIGGERFISH_CHAOS_FAIL_LOAD for the model replicas: MODEL/VERSION[,...] whose first load
    # on this machine fails once with a transient error (reliability runs only).
    chaos_fail_load: str = ""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.nodes < 1:
            raise ValueError(f"replicas and nodes must be >= 1, got {self.replicas} and {self.nodes}")
        if self.data_plane not in DATA_PLANES:
            raise ValueError(f"data_plane must be one of {DATA_PLANES}, got {self.data_plane!r}")
        if not self.idle_delay_s >= 0:
            raise ValueError(f"idle_delay_s must be >= 0, got {self.idle_delay_s!r}")


# What a process logs when a port it was given is bound by another (Linux, Java, Go, HAProxy).
PORT_TAKEN = "Address already in use"
START_ATTEMPTS = 3


class LocalStack:
    """Starts and stops the local stack's processes."""

    def __init__(self, options: StackOptions) -> None:
        self.options = options
        self.footprint: Footprint = load_footprint()
        self.processes: list[ManagedProcess] = []
        self.state: StackState | None = None
        self._log_dir = options.state_dir / "logs"
        # HAProxy's and Ray's sockets need short paths (at most 107 bytes), so not under state_dir.
        self._private_dirs: dict[str, Path] = {}
        # How each worker node was started (argv, env), so that a lost node can come back.
        self._worker_specs: dict[int, tuple[list[str], dict[str, str]]] = {}

    def start(self, progress=lambda msg: None) -> StackState:  # noqa: ANN001
        """Start every part; on any failure stop what was started and re-raise.

        The stack picks its ports up front and its processes bind them seconds later
        (Ray, HAProxy, the emulators), so another process on the machine may take one
        meanwhile: when a part fails with :data:`PORT_TAKEN`, the stack starts again
        on other ports, up to :data:`START_ATTEMPTS` times in all.
        """
        attempt = 1
        while True:
            try:
                return self._start(progress)
            except Exception as err:
                self.stop()
                if attempt == START_ATTEMPTS or PORT_TAKEN not in str(err):
                    raise
                attempt += 1
                progress(f"a port was taken while the stack started; starting again on other ports ({attempt}/{START_ATTEMPTS})")
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
        # The Ingress replicas' direct ports: one range for all nodes (see ingress_port_span);
        # with the direct data plane it starts at Serve's own port.
        span = ingress_port_span(opts.replicas, opts.nodes)
        serve_port = opts.serve_port or free_port_block(span if opts.data_plane == "direct" else 1)
        ingress = NodePorts(
            ingress_http=serve_port if opts.data_plane == "direct" else free_port_block(span, avoid=RAY_FIXED_PORTS),
            ingress_grpc=free_port_block(span, avoid=RAY_FIXED_PORTS),
            span=span,
        )
        # Ray binds some fixed ports of its own (the dashboard agent's 52365 among them).
        metrics_port = free_port(avoid=RAY_FIXED_PORTS)
        proxy_port = free_port(avoid=RAY_FIXED_PORTS)
        # One functions-framework process per entry point, as the cloud has one function each.
        fn_ports = {sub.entry_point: free_port() for sub in fp.push_subscriptions}
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
        # No ID tokens on this machine: auth off, explicitly. The request deadline is the
        # cloud's (the footprint's), so the local stack nests its timeouts the same way.
        serve_env = {
            "TRIGGERFISH_AUTH": "off",
            **fp.serve_environment(),
            **env,
            **self._chaos_env(),
            **self._cluster_auth_env(),
        }
        serve = self._spawn("serve", self._serve_argv(serve_port, metrics_port, proxy_port, ingress), serve_env)
        if opts.nodes > 1:
            self._start_worker_nodes(serve_env, serve, ingress, progress)
        fn_argv = _emulators.function_argv
        fn_env = _emulators.function_env(env, fp)
        # In the cloud the bulk function has instances of its own; on one machine its process
        # runs at a lower priority, so bulk work never takes the CPU from a live event's function.
        functions = {
            entry: self._spawn(
                f"fn-{entry.replace('_', '-')}",
                (BULK_NICE_ARGV if entry == fp.bulk_subscription.entry_point else []) + fn_argv(entry, port),
                fn_env,
            )
            for entry, port in fn_ports.items()
        }
        for entry, process in functions.items():
            wait_until(lambda port=fn_ports[entry]: port_open(port), 60, f"the {entry} function", process)
        _emulators.create_push_subscriptions(env, PROJECT, fp)
        self._spawn("push-dispatcher", _emulators.dispatcher_argv(PROJECT, fp, fn_ports), env)
        wait_until(
            lambda: _healthy(serve_port), opts.startup_timeout_s, "Ray Serve to be ready", serve
        )
        if opts.replicas > 1 and not opts.scale_to_zero:
            wait_until(self._all_replicas_placed, opts.startup_timeout_s, f"{opts.replicas} replicas each", serve)
        self.state = StackState(
            project=PROJECT,
            pubsub_host=pubsub_host,
            storage_host=storage_host,
            serve_url=f"http://127.0.0.1:{serve_port}",
            serve_proxy_url=f"http://127.0.0.1:{proxy_port}",
            metrics_url=f"http://127.0.0.1:{metrics_port}/metrics",
            request_function_url=f"http://127.0.0.1:{fn_ports['on_request']}",
            upload_function_url=f"http://127.0.0.1:{fn_ports['on_upload']}",
            bulk_function_url=f"http://127.0.0.1:{fn_ports['on_bulk']}",
            images_bucket=fp.images_bucket,
            results_bucket=fp.results_bucket,
            models_bucket=fp.models_bucket,
            requests_topic=fp.requests_topic,
            uploads_topic=fp.uploads_topic,
            bulk_topic=fp.bulk_topic,
            results_topic=fp.results_topic,
            dead_letter_topic=fp.dead_letter_topic,
            default_model=opts.default_model,
            supervisor_pid=os.getpid(),
            process_groups={p.name: p.pid for p in self.processes},
            replicas=opts.replicas,
            nodes=opts.nodes,
            scale_to_zero=opts.scale_to_zero,
            data_plane=opts.data_plane,
            state_dir=str(opts.state_dir.resolve()),
        )
        self.state.save(opts.state_dir)
        return self.state

    def _serve_argv(self, serve_port: int, metrics_port: int, proxy_port: int, ingress: NodePorts) -> list[str]:
        opts = self.options
        argv = [sys.executable, "-m", "infra.local.serve_host", "--port", str(serve_port),
                "--metrics-port", str(metrics_port), "--data-plane", opts.data_plane,
                "--state-dir", str(opts.state_dir.resolve()),
                "--ingress-port", str(ingress.ingress_http), "--ingress-grpc-port", str(ingress.ingress_grpc),
                "--ingress-span", str(ingress.span)]  # fmt: skip
        if opts.data_plane == "direct":
            argv += ["--proxy-port", str(proxy_port)]
        if opts.data_plane == "haproxy":
            argv += ["--haproxy-dir", str(self._private_dir("hap"))]
        if opts.replicas != 1 or opts.nodes != 1:
            argv += ["--replicas", str(opts.replicas), "--nodes", str(opts.nodes)]
        if opts.nodes > 1:
            # `ray start` records its cluster in <temp dir>/ray_current_cluster, where any
            # ray.init() on this machine would find it: keep the cluster's temp dir private.
            argv += ["--ray-temp-dir", str(self._private_dir("ray"))]
        if opts.scale_to_zero:
            argv += ["--scale-to-zero", "--idle-delay-s", str(opts.idle_delay_s)]
        return argv

    def _chaos_env(self) -> dict[str, str]:
        if not self.options.chaos_fail_load:
            return {}
        chaos_dir = (self.options.state_dir / "chaos").resolve()
        chaos_dir.mkdir(parents=True, exist_ok=True)
        return {"TRIGGERFISH_CHAOS_FAIL_LOAD": self.options.chaos_fail_load, "TRIGGERFISH_CHAOS_DIR": str(chaos_dir)}

    def _cluster_auth_env(self) -> dict[str, str]:
        """Ray's token authentication with a token of this stack's own, shared by every node.

        A single node needs none set here (``ray.init`` handles its own); worker raylets
        started with ``ray start`` join only with the head's token.
        """
        if self.options.nodes == 1:
            return {}
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}

    def _private_dir(self, kind: str) -> Path:
        """A short private directory under the system temp dir (Unix sockets live there)."""
        if kind not in self._private_dirs:
            self._private_dirs[kind] = Path(tempfile.mkdtemp(prefix=f"tf-{kind}-"))
        return self._private_dirs[kind]

    def _start_worker_nodes(self, env: dict[str, str], head: ManagedProcess, ingress: NodePorts, progress) -> None:  # noqa: ANN001
        """Start nodes 1..M-1 as ``ray start --block`` raylets joined to the head's GCS."""
        opts = self.options
        address_file = opts.state_dir / ADDRESS_FILE
        address_file.unlink(missing_ok=True)
        wait_until(address_file.is_file, 120, "the Ray head's address", head)
        address = address_file.read_text().strip()
        for index in range(1, opts.nodes):
            ports = NodePorts(
                ingress_http=ingress.ingress_http,
                ingress_grpc=ingress.ingress_grpc,
                span=ingress.span,
                proxy=free_port(avoid=RAY_FIXED_PORTS),
                haproxy_stats=free_port(avoid=RAY_FIXED_PORTS),
                haproxy_metrics=free_port(avoid=RAY_FIXED_PORTS),
                agent=free_port(avoid=RAY_FIXED_PORTS),
                metrics_export=free_port(avoid=RAY_FIXED_PORTS),
            )
            node_dir = self._private_dir("hap") if opts.data_plane == "haproxy" else opts.state_dir
            worker_env = {
                **LOCAL_WORKER_ENV,  # unless the operator set it (as serve_host does for the head)
                **env,
                **node_env(opts.data_plane, ports, head=False, runtime_dir=node_dir),
                # Each node is a machine of its own, with its own local engine cache (as each
                # GKE node has its own disk); the shared cache stays the models' GCS bucket.
                "TRIGGERFISH_ENGINE_CACHE_DIR": str((opts.state_dir / f"engine-cache-node-{index}").resolve()),
            }
            # Logical CPUs only: replicas reserve none (num_cpus 0), so two cores carry any shape.
            argv = worker_argv(address, index, ports, num_cpus=os.cpu_count() or 2, temp_dir=self._private_dir("ray"))
            progress(f"starting Ray worker node {index} (joins {address})")
            self._worker_specs[index] = (argv, worker_env)
            self._spawn(f"{WORKER_NODE_PREFIX}{index}", argv, worker_env)

    def kill_node(self, index: int) -> int:
        """SIGKILL worker node ``index`` (its raylet and every worker on it), like a lost machine.

        Returns the number of processes killed.
        """
        process = self._worker(index)
        victims = session_pids(process.pid)
        kill_session(process.pid, grace_s=10)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(process.pid, 0)
        self.processes.remove(process)
        self._publish_groups()
        return len(victims)

    def restart_node(self, index: int) -> None:
        """Start worker node ``index`` again as it was first started (a replaced machine)."""
        if index not in self._worker_specs:
            raise ValueError(f"no worker node {index} (nodes: {sorted(self._worker_specs)})")
        if any(p.name == f"{WORKER_NODE_PREFIX}{index}" for p in self.processes):
            raise RuntimeError(f"worker node {index} is running")
        argv, env = self._worker_specs[index]
        self._spawn(f"{WORKER_NODE_PREFIX}{index}", argv, env)
        self._publish_groups()

    def _worker(self, index: int) -> ManagedProcess:
        for process in self.processes:
            if process.name == f"{WORKER_NODE_PREFIX}{index}":
                return process
        raise ValueError(f"no running worker node {index}")

    def _publish_groups(self) -> None:
        if self.state is not None:
            self.state.process_groups = {p.name: p.pid for p in self.processes}
            self.state.save(self.options.state_dir)

    def _all_replicas_placed(self) -> bool:
        snapshot = ClusterSnapshot.load(self.options.state_dir / REPLICAS_FILE)
        if snapshot is None:
            return False
        counts = [len(r) for r in snapshot.by_deployment().values()]
        return bool(counts) and min(counts) >= self.options.replicas

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        process = start_process(name, argv, self._log_dir, env, cwd=REPO_ROOT)
        self.processes.append(process)
        return process

    def stop(self) -> None:
        """Stop children in reverse start order (the worker raylets after the head, whose
        Serve shutdown stops their replicas); remove the state file."""
        def order(process: ManagedProcess) -> int:
            return 1 if process.name.startswith(WORKER_NODE_PREFIX) else 0

        for process in sorted(reversed(self.processes), key=order):
            # Ray needs time to stop its workers cleanly; the others stop at once.
            stop_group(process.pid, grace_s=30.0 if process.name == "serve" else 10.0)
        self.processes.clear()
        for path in self._private_dirs.values():
            shutil.rmtree(path, ignore_errors=True)
        self._private_dirs.clear()
        state_file = self.options.state_dir / "stack.json"
        if self.state is not None and state_file.exists():
            state_file.unlink()
        self.state = None


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
