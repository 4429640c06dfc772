"""The reliability run's scenarios that need the production shape (``--replicas 2 --nodes 2``).

* Node loss: one-URI messages while the worker node that holds a model replica is
  SIGKILLed (its raylet and every worker on it, HAProxy included), then the node is
  started again, as GKE would replace it. Passes with one ``ok`` result per message,
  no other object and nothing dead-lettered.
* Rollout under load: one-URI messages while a new version is published, with
  ``TRIGGERFISH_CHAOS_FAIL_LOAD`` making one replica's first load of it fail once.
  Passes when every input ends ``ok`` at the old or the new version, no result says
  ``unknown_version``, and every model replica promoted the new version within three
  repository poll intervals of its publication (read from the replicas' log lines).
* Scale to zero (a stack of its own, ``--scale-to-zero``): messages, uploads and HTTP
  calls sent while the model has no replica. Passes with one ``ok`` result each,
  nothing dead-lettered, and every HTTP call answered with a result or 503 with
  ``Retry-After`` (never a timeout or a 500); reports the time to the first and the
  last result (the local cold start).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from infra.bench.reliability import (
    MODEL,
    SAMPLES,
    ChaosReport,
    _count_lines,
    _dead_letters,
    chaos_result_prefix,
    check_results,
    publish_one_uri_messages,
    publish_version,
    replica_pids,
    result_names,
    stage_photos,
    wait_for,
)
from infra.local.client import StackClient
from infra.local.stack import LocalStack, StackState
from shared.results import result_object_name
from shared.uris import GcsUri

logger = logging.getLogger("infra.bench.reliability")

DEPLOYMENT = f"Model_{MODEL}"
# "(ServeReplica:triggerfish:Model_x pid=123) {json}": Ray's prefix on a replica's log line.
_REPLICA_LINE = re.compile(r"\(ServeReplica:triggerfish:(?P<deployment>[^ ]+) pid=(?P<pid>\d+)\)\S*\s+(?P<body>\{.*\})")


def wait_for_results(client: StackClient, prefix: str, count: int, started: float, timeout_s: float) -> tuple[float, float]:
    """Poll until ``count`` results exist under ``prefix``; seconds from ``started`` to the
    first and to the last result (``nan`` when none or not all came)."""
    first = last = float("nan")
    while time.monotonic() - started < timeout_s:
        done = len(result_names(client, prefix))
        if done and first != first:  # nan: not seen yet
            first = time.monotonic() - started
        if done >= count:
            last = time.monotonic() - started
            break
        time.sleep(0.5)
    return first, last


# -- node loss --------------------------------------------------------------------------------
@dataclass
class NodeLossReport(ChaosReport):
    node: int | None = None
    killed_processes: int = 0
    killed_at_results: int = 0
    replicas_back_s: float = float("nan")


def run_node_loss(stack: LocalStack, messages: int, timeout_s: float) -> NodeLossReport:
    state = stack.state
    assert state is not None
    client = StackClient(state)
    names = [f"node-loss/{i:05d}.jpg" for i in range(messages)]
    stage_photos(client, names)
    report = NodeLossReport(messages)
    prefix = chaos_result_prefix("node-loss")
    redeliveries = _count_lines(state, "push-dispatcher", "redelivery in")
    started = publish_one_uri_messages(client, names, "node-loss")
    done = 0
    while done < messages and time.monotonic() - started < timeout_s:
        done = len(result_names(client, prefix))
        if report.node is None and done >= messages // 3:
            report.node = _worker_holding_a_model_replica(state)
            report.killed_at_results = done
            report.killed_processes = stack.kill_node(report.node)
            logger.info("killed worker node %d (%d processes) at %d results", report.node, report.killed_processes, done)
        time.sleep(1.0)
    report.duration_s = time.monotonic() - started
    time.sleep(10)  # redeliveries still in flight would land now
    check_results(client, report, {f"{prefix}{n.split('/', 1)[1]}.json" for n in names}, prefix)
    report.failed_deliveries = _count_lines(state, "push-dispatcher", "redelivery in") - redeliveries
    report.dead_letters = _dead_letters(client)
    if report.node is not None:
        restarted = time.monotonic()
        stack.restart_node(report.node)
        if wait_for(lambda: replicas_serving(state), 240, 1.0):
            report.replicas_back_s = time.monotonic() - restarted
    return report


def _worker_holding_a_model_replica(state: StackState) -> int:
    snapshot = state.cluster()
    nodes = sorted({r.node for r in (snapshot.replicas if snapshot else []) if r.deployment == DEPLOYMENT and r.node})
    if not nodes:
        raise RuntimeError(f"no worker node holds a {DEPLOYMENT} replica: {snapshot}")
    return nodes[0]


# -- rollout under load -----------------------------------------------------------------------
@dataclass
class RolloutReport(ChaosReport):
    version: str = ""
    versions: dict[str, int] = field(default_factory=dict)
    unknown_version_records: int = 0
    # Replica pid -> seconds from the start of publishing to its promotion. Publishing (every
    # file of the version) takes upload_s; a replica may see the version complete before the
    # last file's upload call returns.
    promotions_s: dict[int, float] = field(default_factory=dict)
    upload_s: float = 0.0
    poll_s: float = 2.0
    injected_failures: int = 0

    @property
    def promoted_in_time(self) -> bool:
        """Every replica promoted within three poll intervals of the version's upload finishing."""
        return bool(self.promotions_s) and max(self.promotions_s.values()) <= self.upload_s + 3 * self.poll_s

    @property
    def passed(self) -> bool:
        return super().passed and not self.unknown_version_records and self.promoted_in_time


def run_rollout(state: StackState, messages: int, version: str, poll_s: float, chaos_dir: Path | None,
                timeout_s: float) -> RolloutReport:  # fmt: skip
    client = StackClient(state)
    names = [f"rollout/{i:05d}.jpg" for i in range(messages)]
    stage_photos(client, names)
    report = RolloutReport(messages, version=version, poll_s=poll_s)
    prefix = chaos_result_prefix("rollout")
    redeliveries = _count_lines(state, "push-dispatcher", "redelivery in")
    started = publish_one_uri_messages(client, names, "rollout")
    published_at: datetime | None = None
    done = 0
    while done < messages and time.monotonic() - started < timeout_s:
        done = len(result_names(client, prefix))
        if published_at is None and done >= messages // 4:
            published_at = datetime.now().astimezone()
            publish_version(client, version)
            report.upload_s = (datetime.now().astimezone() - published_at).total_seconds()
            logger.info("published %s/%s at %d results in %.1f s", MODEL, version, done, report.upload_s)
        time.sleep(1.0)
    report.duration_s = time.monotonic() - started
    time.sleep(max(10.0, 3 * poll_s))  # redeliveries in flight, and the last promotions
    results = check_results(client, report, {f"{prefix}{n.split('/', 1)[1]}.json" for n in names}, prefix)
    report.versions = dict(Counter(r.get("model", {}).get("version", "?") for r in results.values()))
    report.unknown_version_records = sum(
        (r.get("error") or {}).get("reason") == "unknown_version" for r in results.values()
    )
    report.failed_deliveries = _count_lines(state, "push-dispatcher", "redelivery in") - redeliveries
    report.dead_letters = _dead_letters(client)
    if published_at is not None:
        promotions = replica_promotions(state, version)
        for pid in replica_pids(state, DEPLOYMENT):  # a live replica that never promoted counts as never
            at = promotions.get(pid)
            report.promotions_s[pid] = (at - published_at).total_seconds() if at else float("inf")
    if chaos_dir is not None and chaos_dir.is_dir():
        report.injected_failures = sum(1 for _ in chaos_dir.iterdir())
    return report


def replicas_serving(state: StackState) -> bool:
    """Whether the model deployment has its full count of replicas, each with a default version
    (a replica process exists well before it has loaded a model)."""
    live = replica_pids(state, DEPLOYMENT)
    return len(live) == state.replicas and set(live) <= set(replica_promotions(state, None))


def every_replica_promoted(state: StackState, version: str) -> bool:
    """Whether every live model replica has logged making ``version`` its default."""
    live = replica_pids(state, DEPLOYMENT)
    return bool(live) and set(live) <= set(replica_promotions(state, version))


def replica_promotions(state: StackState, version: str | None) -> dict[int, datetime]:
    """When each model replica (by pid) logged making ``version`` (None: any version) its default.

    Every node's replica logs reach the head's driver (``log_to_driver``), prefixed with
    the replica's pid: the Serve process's log holds them all.
    """
    log = Path(state.state_dir) / "logs" / "serve.log"
    needle = f"default version of {MODEL}: "
    found: dict[int, datetime] = {}
    for line in log.read_text(errors="replace").splitlines():
        if needle not in line:
            continue
        match = _REPLICA_LINE.search(line)
        if match is None or match["deployment"] != DEPLOYMENT:
            continue
        try:
            body = json.loads(match["body"])
        except ValueError:
            continue
        if version is None or body.get("message", "").endswith(f"-> {version}"):
            found.setdefault(int(match["pid"]), datetime.fromisoformat(body["time"]))
    return found


# -- scale to zero ----------------------------------------------------------------------------
@dataclass
class ScaleToZeroReport(ChaosReport):
    uploads: int = 0
    zero_after_s: float = float("nan")
    first_result_s: float = float("nan")
    last_result_s: float = float("nan")
    http: dict[str, int] = field(default_factory=dict)  # "200", "503+Retry-After", other answers

    @property
    def http_passed(self) -> bool:
        return bool(self.http) and set(self.http) <= {"200", "503+Retry-After"}

    @property
    def passed(self) -> bool:
        return self.ok == self.messages + self.uploads and not (
            self.errors or self.missing or self.extra_objects or self.dead_letters
        ) and self.http_passed


def run_scale_to_zero(state: StackState, messages: int, uploads: int, http_calls: int,
                      timeout_s: float) -> ScaleToZeroReport:  # fmt: skip
    client = StackClient(state)
    names = [f"zero/{i:05d}.jpg" for i in range(messages)]
    stage_photos(client, names)
    report = ScaleToZeroReport(messages, uploads=uploads)
    waited = time.monotonic()
    if not wait_for(lambda: not replica_pids(state, DEPLOYMENT), 300, 1.0):
        raise RuntimeError(f"{DEPLOYMENT} still has replicas after 300 s idle")
    report.zero_after_s = time.monotonic() - waited
    logger.info("%s at zero replicas after %.1fs idle", DEPLOYMENT, report.zero_after_s)

    cat = (SAMPLES / "cat.jpg").read_bytes()
    upload_names = [f"zero-upload/{i:03d}.jpg" for i in range(uploads)]
    with ThreadPoolExecutor(max(4, http_calls)) as pool:
        calls = [pool.submit(_http_call_at_zero, state.serve_url, cat) for _ in range(http_calls)]
        started = publish_one_uri_messages(client, names, "zero")
        for name in upload_names:
            client.upload(SAMPLES / "cat.jpg", name=name)
        prefix = chaos_result_prefix("zero")
        upload_prefix = f"{MODEL}/{state.images_bucket}/zero-upload/"
        report.first_result_s, _ = wait_for_results(client, prefix, 1, started, timeout_s)
        _, report.last_result_s = wait_for_results(client, prefix, messages, started, timeout_s)
        _, uploads_done_s = wait_for_results(client, upload_prefix, uploads, started, timeout_s)
        report.last_result_s = max(report.last_result_s, uploads_done_s)
        report.http = dict(Counter(c.result() for c in calls))
    report.duration_s = time.monotonic() - started
    time.sleep(10)  # redeliveries still in flight would land now
    messages_report = ChaosReport(messages)
    check_results(client, messages_report, {f"{prefix}{n.split('/', 1)[1]}.json" for n in names}, prefix)
    uploads_report = ChaosReport(uploads)
    upload_expected = {result_object_name(MODEL, GcsUri(state.images_bucket, n)) for n in upload_names}
    check_results(client, uploads_report, upload_expected, upload_prefix)
    for key in ("ok", "errors", "missing", "extra_objects"):
        setattr(report, key, getattr(messages_report, key) + getattr(uploads_report, key))
    report.dead_letters = _dead_letters(client)
    return report


def _http_call_at_zero(serve_url: str, image: bytes) -> str:
    """One call, answered as the contract says: a result, or 503 with Retry-After."""
    try:
        response = httpx.post(
            f"{serve_url}/v1/infer", content=image, headers={"content-type": "image/jpeg"}, timeout=150
        )
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as err:
        return type(err).__name__
    if response.status_code == 503 and response.headers.get("retry-after"):
        return "503+Retry-After"
    return str(response.status_code)



# -- report rows ------------------------------------------------------------------------------
def _outcome_rows(tag: str, report: ChaosReport) -> list[tuple[str, str]]:
    return [
        (f"{tag}: messages published", str(report.messages)),
        (f"{tag}: ok results", str(report.ok)),
        (f"{tag}: error results", str(report.errors)),
        (f"{tag}: missing results", str(report.missing)),
        (f"{tag}: extra objects", str(report.extra_objects)),
        (f"{tag}: dead letters", str(report.dead_letters)),
        (f"{tag}: duration", f"{report.duration_s:.1f} s"),
    ]


def node_loss_rows(report: NodeLossReport) -> list[tuple[str, str]]:
    return [
        *_outcome_rows("node loss", report),
        ("node loss: worker node killed", f"node {report.node} ({report.killed_processes} processes) "
                                          f"at {report.killed_at_results} results"),
        ("node loss: failed deliveries (redelivered)", str(report.failed_deliveries)),
        ("node loss: node restarted, model replicas back after", f"{report.replicas_back_s:.1f} s"),
        ("node loss", "PASS" if report.passed else "FAIL"),
    ]  # fmt: skip


def rollout_rows(report: RolloutReport) -> list[tuple[str, str]]:
    promotions = ", ".join(f"pid {pid}: {s:.1f} s" for pid, s in sorted(report.promotions_s.items()))
    return [
        *_outcome_rows("rollout", report),
        ("rollout: results by version", json.dumps(report.versions, sort_keys=True)),
        ("rollout: unknown_version records", str(report.unknown_version_records)),
        ("rollout: injected load failures (chaos markers)", str(report.injected_failures)),
        (f"rollout: version {report.version} uploaded in", f"{report.upload_s:.1f} s"),
        (f"rollout: version {report.version} default, from the upload's start", promotions or "never"),
        ("rollout: failed deliveries (redelivered)", str(report.failed_deliveries)),
        ("rollout", "PASS" if report.passed else "FAIL"),
    ]


def scale_to_zero_rows(report: ScaleToZeroReport) -> list[tuple[str, str]]:
    return [
        ("scale to zero: zero model replica processes after", f"{report.zero_after_s:.1f} s idle"),
        ("scale to zero: messages + uploads sent at zero", f"{report.messages} + {report.uploads}"),
        ("scale to zero: ok results", str(report.ok)),
        ("scale to zero: error / missing results", f"{report.errors} / {report.missing}"),
        ("scale to zero: extra objects", str(report.extra_objects)),
        ("scale to zero: dead letters", str(report.dead_letters)),
        ("scale to zero: first result after (cold start)", f"{report.first_result_s:.1f} s"),
        ("scale to zero: last result after", f"{report.last_result_s:.1f} s"),
        ("scale to zero: HTTP calls at zero", json.dumps(report.http, sort_keys=True)),
        ("scale to zero", "PASS" if report.passed else "FAIL"),
    ]
