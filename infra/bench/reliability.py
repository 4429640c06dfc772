"""The reliability run (``make reliability``): chaos, node loss, model versions, a rollout under
load and scale to zero, on local stacks of their own in production's shape.

Chaos: ``--messages`` Pub/Sub request messages (one small photo each) while the
model replica process (``ServeReplica:triggerfish:Model_<model>``) is SIGKILLed
``--kills`` times at intervals of progress. The run passes when every message has
exactly one ``ok`` result and nothing else exists under the results bucket.

Versions: a broken newest version (version 1's files with a truncated
``model.onnx``, or with ``--broken config`` a misspelt ``task``) is published
and the replica restarted with SIGKILL: the service must keep serving version 1,
with the refusal visible in ``/v1/stats`` ``quarantined_versions`` and in the
log. Then a good version is promoted and a message delivered before the
promotion is delivered again: one result object, now from the new version; a
late request pinned to the old version does not replace it.

Node loss, rollout under load and scale to zero: see
:mod:`infra.bench.reliability_cluster`. Every scenario runs on the production shape
(``--replicas 2 --nodes 2 --data-plane haproxy`` by default); scale to zero on a
second stack of that shape started with ``--scale-to-zero``.

Prints a summary table; exits non-zero when a check fails.

    python -m infra.bench.reliability [--messages 2000] [--kills 3] [--scenarios chaos,node-loss,...]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from infra.local.client import StackClient
from infra.local.emulators import publish_order
from infra.local.ray_cluster import replica_processes
from infra.local.stack import DEFAULT_MODEL_REPOSITORY, LocalStack, StackOptions, StackState

logger = logging.getLogger("infra.bench.reliability")

MODEL = "mobilenet_v2"
CHAOS_BUCKET = "triggerfish-chaos"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


# -- processes -----------------------------------------------------------------------------
def replica_pids(state: StackState, name: str) -> list[int]:
    """Processes of the Serve deployment ``name``'s replicas on every node of the stack."""
    return replica_processes(state.ray_sessions().values(), name)


def wait_for(check: Callable[[], Any], timeout_s: float, interval_s: float = 0.5) -> Any:
    """Poll ``check`` until it returns something truthy; that value, or ``None`` after the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    return None


class Serve:
    """The stack's Serve endpoint and model replica, as the run observes them."""

    def __init__(self, state: StackState) -> None:
        self.state = state
        self.http = httpx.Client(timeout=30)

    def stats(self) -> dict[str, Any] | None:
        try:
            response = self.http.get(f"{self.state.serve_url}/v1/stats")
            return response.json().get(MODEL) if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def healthy(self) -> bool:
        try:
            return self.http.get(f"{self.state.serve_url}/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def model_pids(self) -> list[int]:
        return replica_pids(self.state, f"Model_{MODEL}")

    def kill_model(self, timeout_s: float = 180) -> tuple[int, float]:
        """SIGKILL one model replica; returns its pid and the seconds until the deployment
        has its full count of replicas again (a new one in place of the killed one) and is healthy."""
        pids = self.model_pids()
        if len(pids) != self.state.replicas:
            raise RuntimeError(f"expected {self.state.replicas} model replica process(es), found {pids}")
        pid = pids[0]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        back = wait_for(
            lambda: len(p := self.model_pids()) == self.state.replicas and pid not in p and self.healthy(),
            timeout_s,
        )
        if not back:
            raise RuntimeError(
                f"the model replica did not come back within {timeout_s:.0f}s of the kill"
            )
        return pid, time.monotonic() - killed


# -- chaos ---------------------------------------------------------------------------------
@dataclass
class ChaosReport:
    messages: int
    ok: int = 0
    errors: int = 0
    missing: int = 0
    extra_objects: int = 0
    kills: list[tuple[int, float]] = field(
        default_factory=list
    )  # (results done at the kill, recovery s)
    failed_deliveries: int = 0
    dead_letters: int = 0
    max_queue_depth: int = 0
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.ok == self.messages and not (
            self.errors or self.missing or self.extra_objects or self.dead_letters
        )


def small_photos() -> list[bytes]:
    """The sample photos as small JPEGs (longer side 320 px)."""
    photos = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((320, 320))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=85)
            photos.append(buffer.getvalue())
    return photos


def result_names(client: StackClient, prefix: str = "") -> list[str]:
    return [b.name for b in client.storage.list_blobs(client.state.results_bucket, prefix=prefix)]


def stage_photos(client: StackClient, names: list[str]) -> None:
    """Upload the small sample photos as ``names`` to the chaos bucket (no notifications)."""
    bucket, photos = client.storage.bucket(CHAOS_BUCKET), small_photos()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: bucket.blob(names[i]).upload_from_string(photos[i % len(photos)]), range(len(names))))
    logger.info("uploaded %d photos to gs://%s", len(names), CHAOS_BUCKET)


def publish_one_uri_messages(client: StackClient, names: list[str], tag: str) -> float:
    """One request message per name (request ids ``<tag>-<i>``); returns the monotonic start."""
    topic = client.publisher.topic_path(client.state.project, client.state.requests_topic)
    started = time.monotonic()
    futures = [
        client.publisher.publish(
            topic, json.dumps({"uri": f"gs://{CHAOS_BUCKET}/{n}", "request_id": f"{tag}-{i}"}).encode()
        )
        for i, n in enumerate(names)
    ]
    for future in futures:
        future.result(timeout=60)
    logger.info("published %d messages in %.1fs", len(names), time.monotonic() - started)
    return started


def chaos_result_prefix(folder: str) -> str:
    """Where the results of the chaos bucket's ``folder`` land."""
    return f"{MODEL}/{CHAOS_BUCKET}/{folder}/"


def run_chaos(state: StackState, messages: int, kills: int, timeout_s: float) -> ChaosReport:
    client, serve = StackClient(state), Serve(state)
    names = [f"chaos/{i:05d}.jpg" for i in range(messages)]
    stage_photos(client, names)
    report = ChaosReport(messages)
    prefix = chaos_result_prefix("chaos")
    kill_at = [int(messages * (k + 1) / (kills + 1)) for k in range(kills)]  # evenly through the run
    redeliveries = _count_lines(state, "push-dispatcher", "redelivery in")
    started = publish_one_uri_messages(client, names, "chaos")

    done = 0
    while done < messages and time.monotonic() - started < timeout_s:
        done = len(result_names(client, prefix))
        stats = serve.stats()
        if stats is not None:
            report.max_queue_depth = max(report.max_queue_depth, stats["queue_depth"])
        if kill_at and done >= kill_at[0]:
            kill_at.pop(0)
            try:
                pid, recovery = serve.kill_model()
            except RuntimeError as err:
                logger.error("kill at %d results: %s", done, err)
                report.kills.append((done, float("nan")))
                continue
            report.kills.append((done, recovery))
            logger.info("killed model replica %d at %d results; healthy again after %.1fs", pid, done, recovery)
        time.sleep(1.0)
    report.duration_s = time.monotonic() - started
    time.sleep(10)  # redeliveries still in flight would land now
    check_results(client, report, {f"{prefix}{n.split('/', 1)[1]}.json" for n in names}, prefix)
    report.failed_deliveries = _count_lines(state, "push-dispatcher", "redelivery in") - redeliveries
    report.dead_letters = _dead_letters(client)
    return report


def read_results(client: StackClient, names: list[str]) -> dict[str, dict]:
    """The stored results ``names`` (object names in the results bucket), parsed."""
    bucket = client.storage.bucket(client.state.results_bucket)
    with ThreadPoolExecutor(8) as pool:
        bodies = pool.map(lambda name: json.loads(bucket.blob(name).download_as_bytes()), names)
        return dict(zip(names, bodies, strict=True))


def check_results(client: StackClient, report: ChaosReport, expected: set[str], prefix: str) -> dict[str, dict]:
    """Count ``ok``/error/missing results among ``expected`` (result object names) and the
    extra objects under ``prefix`` (each scenario's sources live in a folder of their own);
    returns the results found."""
    stored = set(result_names(client, prefix))
    report.extra_objects = len(stored - expected)
    report.missing = len(expected - stored)
    results = read_results(client, sorted(expected & stored))
    report.ok = sum(r["status"] == "ok" for r in results.values())
    report.errors = len(results) - report.ok
    return results


def _count_lines(state: StackState, process: str, needle: str) -> int:
    log = Path(os.readlink(f"/proc/{state.process_groups[process]}/fd/1"))
    return sum(needle in line for line in log.read_text(errors="replace").splitlines())


def _dead_letters(client: StackClient) -> int:
    """Messages on the dead-letter subscription since the last count (pulled and acknowledged,
    so that each scenario counts only its own)."""
    from google.cloud import pubsub_v1

    from infra.footprint import load_footprint

    subscriber = pubsub_v1.SubscriberClient()
    path = subscriber.subscription_path(
        client.state.project, load_footprint().dead_letter_subscription
    )
    count = 0
    while True:
        response = subscriber.pull(subscription=path, max_messages=1000, timeout=10)
        if not response.received_messages:
            return count
        count += len(response.received_messages)
        subscriber.acknowledge(subscription=path, ack_ids=[m.ack_id for m in response.received_messages])


# -- versions ------------------------------------------------------------------------------
@dataclass
class VersionsReport:
    checks: dict[str, tuple[bool, str]] = field(default_factory=dict)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks[name] = (bool(ok), detail)
        logger.info("%s %s %s", "PASS" if ok else "FAIL", name, detail)
        return bool(ok)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for ok, _ in self.checks.values())


def publish_version(client: StackClient, version: str, broken: str | None = None) -> None:
    """Version 1's files as ``version``, its ``config.yaml`` last, as publishing requires
    (:func:`infra.local.emulators.publish_order`).

    ``broken="model"`` cuts its model.onnx in half (a half upload); ``broken="config"``
    misspells the task in its config.yaml (a typo).
    """
    source = DEFAULT_MODEL_REPOSITORY / MODEL / "1"
    bucket = client.storage.bucket(client.state.models_bucket)
    for path in publish_order(source):
        data = path.read_bytes()
        if broken == "model" and path.name == "model.onnx":
            data = data[: len(data) // 2]
        if broken == "config" and path.name == "config.yaml":
            data = data.replace(b"task: classification", b"task: clasification")
        bucket.blob(f"{MODEL}/{version}/{path.relative_to(source).as_posix()}").upload_from_string(
            data
        )


def post(url: str, body: dict, timeout_s: float = 120) -> tuple[int, Any]:
    """POST JSON; ``(status, JSON answer)``, or ``(0, reason)`` when no answer came."""
    try:
        response = httpx.post(url, json=body, timeout=timeout_s)
    except httpx.HTTPError as err:
        return 0, repr(err)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def push_request(state: StackState, message_id: str, body: dict) -> int:
    """Deliver a requests-topic message to the function as a Pub/Sub push; its HTTP status."""
    envelope = {
        "message": {
            "data": base64.b64encode(json.dumps(body).encode()).decode(),
            "messageId": message_id,
        },
        "subscription": "projects/triggerfish-local/subscriptions/reliability",
    }
    url = f"{state.request_function_url}/projects/{state.project}/topics/{state.requests_topic}"
    return post(url, envelope)[0]


def _quarantined(versions: dict[str, str] | None) -> str:
    """``/v1/stats`` ``quarantined_versions`` in a table cell: each version, its error type, the cause's end."""
    return "; ".join(
        f"{v}: {why.split(':', 1)[0]} ...{why[-60:]}" for v, why in (versions or {}).items()
    )


def run_versions(state: StackState, broken: str) -> VersionsReport:
    client, serve, report = StackClient(state), Serve(state), VersionsReport()
    name = "versions/cat.jpg"
    client.storage.bucket(CHAOS_BUCKET).blob(name).upload_from_string(
        (SAMPLES / "cat.jpg").read_bytes()
    )
    uri, message = f"gs://{CHAOS_BUCKET}/{name}", {"uri": f"gs://{CHAOS_BUCKET}/{name}"}
    first = push_request(state, "versions-1", message)
    before = client.find_result(uri, MODEL)
    report.check(
        "message before the promotion: version 1",
        first == 200 and before and before["model"]["version"] == "1",
    )

    publish_version(client, "2", broken=broken)
    seen = wait_for(lambda: (s := serve.stats()) and "2" in s["quarantined_versions"] and s, 60)
    report.check(
        "running replica quarantines broken version 2",
        seen,
        _quarantined((seen or {}).get("quarantined_versions")),
    )
    try:
        pid, recovery = serve.kill_model(timeout_s=120)
        restarted = f"replica {pid} killed, healthy after {recovery:.1f}s"
    except RuntimeError as err:
        restarted = str(err)
    stats = serve.stats() or {}
    report.check(
        "restarted replica serves version 1",
        stats.get("default_version") == "1" and serve.healthy(),
        restarted,
    )
    report.check(
        "refusal in /v1/stats",
        "2" in stats.get("quarantined_versions", {}),
        _quarantined(stats.get("quarantined_versions")),
    )
    refused = _count_lines(state, "serve", f"version {MODEL}/2 refused and quarantined")
    report.check("refusal logged", refused > 0, f"{refused} ERROR lines")
    status, answer = post(f"{state.serve_url}/v1/infer", message, timeout_s=60)
    served = status == 200 and answer["results"][0].get("model", {}).get("version") == "1"
    report.check("requests answered by version 1", served, f"HTTP {status}")

    publish_version(client, "3")
    promoted = wait_for(lambda: (s := serve.stats()) and s["default_version"] == "3", 120)
    # With several replicas, /v1/stats answers from one: wait until each has logged the promotion.
    from infra.bench.reliability_cluster import every_replica_promoted

    everywhere = wait_for(lambda: every_replica_promoted(state, "3"), 120)
    report.check("good version 3 promoted", promoted and everywhere, f"on {state.replicas} replica(s)")
    again = push_request(state, "versions-1", message)  # the same message, delivered again
    objects = result_names(client, f"{MODEL}/{CHAOS_BUCKET}/versions/")
    after = client.find_result(uri, MODEL) or {}
    report.check(
        "redelivery across the promotion: one result object, version 3",
        again == 200 and len(objects) == 1 and after.get("model", {}).get("version") == "3",
        f"{len(objects)} object(s): {objects}",
    )
    pinned = push_request(state, "versions-2", {**message, "version": "1"})
    kept = client.find_result(uri, MODEL) or {}
    report.check(
        "late request pinned to version 1 does not replace it",
        pinned == 200 and kept.get("model", {}).get("version") == "3",
    )
    return report


# -- report --------------------------------------------------------------------------------
def chaos_rows(chaos: ChaosReport) -> list[tuple[str, str]]:
    kills = ", ".join(f"at {done} results, back in {s:.1f} s" for done, s in chaos.kills)
    return [
        ("chaos: messages published", str(chaos.messages)),
        ("chaos: ok results", str(chaos.ok)),
        ("chaos: error results", str(chaos.errors)),
        ("chaos: missing results", str(chaos.missing)),
        ("chaos: extra objects in the results bucket", str(chaos.extra_objects)),
        ("chaos: model replica SIGKILLs", f"{len(chaos.kills)} ({kills})"),
        ("chaos: failed deliveries (redelivered)", str(chaos.failed_deliveries)),
        ("chaos: dead letters", str(chaos.dead_letters)),
        ("chaos: max queue depth (/v1/stats)", str(chaos.max_queue_depth)),
        ("chaos: duration", f"{chaos.duration_s:.1f} s"),
        ("chaos", "PASS" if chaos.passed else "FAIL"),
    ]


def versions_rows(versions: VersionsReport) -> list[tuple[str, str]]:
    return [
        (f"versions: {name}", ("PASS" if ok else "FAIL") + (f"  {detail[:100]}" if detail else ""))
        for name, (ok, detail) in versions.checks.items()
    ]


def summary(rows: list[tuple[str, str]]) -> str:
    width = max((len(k) for k, _ in rows), default=0)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows) + "\n"


SCENARIOS = ("chaos", "node-loss", "versions", "rollout", "scale-to-zero")
# The version the rollout scenario publishes under load (after the versions scenario's 2 and 3),
# and whose first load on this machine fails once (TRIGGERFISH_CHAOS_FAIL_LOAD).
ROLLOUT_VERSION = "4"
POLL_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="one-URI messages per load scenario")
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1200, help="seconds each load scenario may take")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: a new temporary folder")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of every deployment (default 2)")
    parser.add_argument("--nodes", type=int, default=2, help="Ray nodes on this machine (default 2)")
    parser.add_argument("--data-plane", choices=("direct", "proxy", "haproxy"), default="haproxy")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, in this order: {','.join(SCENARIOS)}")  # fmt: skip
    parser.add_argument("--skip-chaos", action="store_true", help="same as leaving chaos out of --scenarios")
    parser.add_argument("--zero-messages", type=int, default=200, help="scale to zero: messages sent at zero")
    parser.add_argument("--zero-uploads", type=int, default=20, help="scale to zero: uploads sent at zero")
    parser.add_argument("--zero-http", type=int, default=20, help="scale to zero: HTTP calls sent at zero")
    parser.add_argument("--idle-delay", type=float, default=10.0, help="scale to zero: idle seconds before zero")
    parser.add_argument(
        "--broken", choices=("model", "config"), default="model",
        help="how the newest version is broken: a half-uploaded model.onnx or a config typo",
    )  # fmt: skip
    args = parser.parse_args(argv)
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {SCENARIOS}")
    if args.skip_chaos and "chaos" in scenarios:
        scenarios.remove("chaos")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    # SIGTERM unwinds like Ctrl-C, so the stack's process groups are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    from infra.bench import reliability_cluster as cluster

    state_root = args.state_dir or Path(tempfile.mkdtemp(prefix="triggerfish-reliability-"))
    rows: list[tuple[str, str]] = [
        ("shape", f"{args.replicas} replica(s) x {args.nodes} node(s), data plane {args.data_plane}"),
    ]
    passed: list[bool] = []
    main_scenarios = [s for s in scenarios if s != "scale-to-zero"]
    if main_scenarios:
        stack = LocalStack(_options(args, state_root / "stack", scale_to_zero=False))
        try:
            state = stack.start(progress=logger.info)
            os.environ.update(state.client_env())
            StackClient(state).storage.create_bucket(CHAOS_BUCKET)  # a source bucket without notifications
            for name in main_scenarios:
                logger.info("scenario %s", name)
                if name == "chaos":
                    report = run_chaos(state, args.messages, args.kills, args.timeout)
                    rows += chaos_rows(report)
                elif name == "node-loss":
                    report = cluster.run_node_loss(stack, args.messages, args.timeout)
                    rows += cluster.node_loss_rows(report)
                elif name == "versions":
                    report = run_versions(state, args.broken)
                    rows += versions_rows(report)
                else:
                    chaos_dir = Path(state.state_dir) / "chaos"
                    report = cluster.run_rollout(state, args.messages, ROLLOUT_VERSION, POLL_S, chaos_dir, args.timeout)
                    rows += cluster.rollout_rows(report)
                passed.append(report.passed)
        finally:
            stack.stop()
    if "scale-to-zero" in scenarios:
        stack = LocalStack(_options(args, state_root / "zero-stack", scale_to_zero=True))
        try:
            state = stack.start(progress=logger.info)
            os.environ.update(state.client_env())
            StackClient(state).storage.create_bucket(CHAOS_BUCKET)
            report = cluster.run_scale_to_zero(state, args.zero_messages, args.zero_uploads, args.zero_http, args.timeout)
            rows += cluster.scale_to_zero_rows(report)
            passed.append(report.passed)
        finally:
            stack.stop()
    sys.stdout.write(summary(rows))
    return 0 if passed and all(passed) else 1


def _options(args: argparse.Namespace, state_dir: Path, scale_to_zero: bool) -> StackOptions:
    return StackOptions(
        state_dir=state_dir,
        replicas=args.replicas,
        nodes=args.nodes,
        data_plane=args.data_plane,
        scale_to_zero=scale_to_zero,
        idle_delay_s=args.idle_delay,
        chaos_fail_load="" if scale_to_zero else f"{MODEL}/{ROLLOUT_VERSION}",
        extra_env={
            "TRIGGERFISH_MODELS": MODEL,
            "TRIGGERFISH_ALLOWED_BUCKETS": f"triggerfish-images,{CHAOS_BUCKET}",
            "TRIGGERFISH_REPOSITORY_POLL_S": str(POLL_S),
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
