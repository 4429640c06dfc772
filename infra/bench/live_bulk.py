"""Live uploads beside a backfill: does live work keep its latency, and the backfill its rate?

On one local stack started for the run, in one process, side by side:

1. ``live alone``: uploads to the images bucket at a steady ``--live-rate`` per second
   for ``--live-seconds``; each upload's end-to-end time runs from the object's
   creation to its result's, both stamped by the storage emulator;
2. ``bulk alone``: ``triggerfish submit`` (in process: :func:`infra.ops.backfill_run.run_backfill`)
   over ``--objects`` photos in a bucket without notifications, as bulk work;
3. ``live beside bulk``: the same backfill over as many other photos, with live uploads
   at the same rate for the whole of it;
4. ``live beside a live backfill`` (unless ``--no-compare``): the same again with the
   backfill sent as live work (``submit --priority live``), which is how every backfill
   ran before the classes existed.

It reports live p50/p95 per phase, where the live p95 goes (before Serve, in Serve, the
result's write), the backfill's rate per phase, the ratios the targets are stated in (live
p95 beside bulk / alone, backfill rate beside live / alone) and what Serve shed per class.
Every phase meets emptied buckets.

    python -m infra.bench.live_bulk --objects 3000 --out /tmp/live-bulk.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from infra.local.client import StackClient
from infra.local.stack import LocalStack, StackOptions, StackState
from infra.ops.backfill_run import BackfillOptions, run_backfill
from infra.ops.target import local_target
from shared.messages import Priority

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
PHOTOS = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "text.jpg")
ARCHIVE_BUCKET = "triggerfish-bench-archive"  # readable by Serve, not notified
MODEL = "mobilenet_v2"
UPLOAD_CONCURRENCY = 8


@dataclass
class LiveUploads:
    """Uploads one photo every ``1 / rate`` seconds until stopped; remembers each one's creation time."""

    client: StackClient
    prefix: str
    rate: float
    images: list[bytes]
    created: dict[str, float] = field(default_factory=dict)  # object name -> creation (epoch s)
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        bucket = self.client.storage.bucket(self.client.state.images_bucket)
        period, n = 1.0 / self.rate, 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            name = f"{self.prefix}/{n:05d}.jpg"
            blob = bucket.blob(name)
            blob.upload_from_string(self.images[n % len(self.images)], content_type="image/jpeg")
            self.created[name] = blob.time_created.timestamp()
            n += 1
            next_at += period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> LiveUploads:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class LiveBulkBench:
    def __init__(self, state: StackState, args: argparse.Namespace, progress: Callable[[str], None]) -> None:
        self.state, self.args, self.progress = state, args, progress
        self.client = StackClient(state)
        self.images = [(SAMPLES / name).read_bytes() for name in PHOTOS]
        self.target = local_target(state, Path(state.state_dir))

    def stage(self, prefix: str, count: int) -> str:
        bucket = self.client.storage.bucket(ARCHIVE_BUCKET)
        with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
            list(pool.map(
                lambda i: bucket.blob(f"{prefix}/{i:05d}.jpg").upload_from_string(
                    self.images[i % len(self.images)], content_type="image/jpeg"
                ),
                range(count),
            ))  # fmt: skip
        return f"gs://{ARCHIVE_BUCKET}/{prefix}/"

    def clear(self) -> None:
        """Empty the archive and results buckets: the emulator's listings grow with them."""
        for name in (ARCHIVE_BUCKET, self.state.results_bucket):
            blobs = list(self.client.storage.list_blobs(name))
            with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
                list(pool.map(lambda b: b.delete(), blobs))

    def live_latencies(self, uploads: LiveUploads, since: float, until: float) -> dict[str, list[float]]:
        """Seconds per upload created in [since, until]: ``end_to_end`` from the emulator's own
        stamps (the object's creation to its result's); ``in_serve``, the result's
        ``timings.end_to_end_ms`` (fetch to result); ``before_serve`` (the notification, the push
        and the function: the rest up to the result's ``created_at``); ``write`` (``created_at``
        to the stored result's stamp)."""
        prefix = f"{MODEL}/{self.state.images_bucket}/{uploads.prefix}/"
        deadline = time.monotonic() + 120
        wanted = {n for n, t in uploads.created.items() if since <= t <= until}
        while True:
            results = {
                b.name.removeprefix(f"{MODEL}/{self.state.images_bucket}/").removesuffix(".json"): b
                for b in self.client.storage.list_blobs(self.state.results_bucket, prefix=prefix)
            }
            if wanted <= set(results) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        missing = wanted - set(results)
        if missing:
            raise RuntimeError(f"{len(missing)} live uploads have no result after 120 s, e.g. {sorted(missing)[:3]}")
        names = sorted(wanted)
        with ThreadPoolExecutor(UPLOAD_CONCURRENCY) as pool:
            bodies = list(pool.map(lambda n: json.loads(results[n].download_as_bytes()), names))
        self.timings = [b.get("timings") or {} for b in bodies]
        split: dict[str, list[float]] = {"end_to_end": [], "in_serve": [], "before_serve": [], "write": []}
        for name, body, timings in zip(names, bodies, self.timings, strict=True):
            stored, created = results[name].updated.timestamp(), uploads.created[name]
            made = datetime.fromisoformat(body["created_at"]).timestamp()
            in_serve = timings.get("end_to_end_ms", 0.0) / 1000
            split["end_to_end"].append(stored - created)
            split["in_serve"].append(in_serve)
            split["before_serve"].append(made - in_serve - created)
            split["write"].append(stored - made)
        return split

    def admission(self) -> dict[str, Any]:
        return httpx.get(f"{self.state.serve_url}/v1/admission", timeout=30).json()["classes"]

    def backfill(self, source: str, priority: Priority) -> dict[str, Any]:
        sink = _QuietSink()
        options = BackfillOptions(source=source, model=MODEL, priority=priority, stall_timeout_s=120)
        before = self.admission()
        started = time.time()
        summary = run_backfill(self.target, options, sink)
        ended = time.time()
        after = self.admission()
        return {
            "priority": priority.value, "objects": summary.found, "ok": summary.ok,
            "errors": dict(summary.errors), "unfinished": summary.unfinished,
            "seconds": round(summary.elapsed_s, 2),
            "images_per_s": round(summary.processed / summary.elapsed_s, 2) if summary.elapsed_s else None,
            "serve_shed_inputs": {p: after[p]["shed_inputs"] - before[p]["shed_inputs"] for p in after},
            "window": (started, ended),
        }  # fmt: skip

    def live_phase(self, name: str, seconds: float | None, backfill: Callable[[], dict] | None) -> dict[str, Any]:
        self.progress(f"{name}: live uploads at {self.args.live_rate}/s")
        with LiveUploads(self.client, f"live-{name}", self.args.live_rate, self.images) as uploads:
            started = time.time()
            bulk = backfill() if backfill is not None else None
            if bulk is None:
                time.sleep(seconds or 0)
            ended = time.time()
        split = self.live_latencies(uploads, started, ended)
        latencies, in_serve = split["end_to_end"], split["in_serve"]
        phase: dict[str, Any] = {
            "live_uploads": len(latencies),
            "live_p50_s": round(_percentile(latencies, 0.5) or 0, 3),
            "live_p95_s": round(_percentile(latencies, 0.95) or 0, 3),
            "live_mean_s": round(statistics.fmean(latencies), 3) if latencies else None,
            # How much of it the ingress saw (fetch to stored result); the rest is the
            # notification, the push, the function and the write's own return.
            "live_in_serve_p50_s": round(_percentile(in_serve, 0.5) or 0, 3),
            "live_in_serve_p95_s": round(_percentile(in_serve, 0.95) or 0, 3),
            "live_before_serve_p95_s": round(_percentile(split["before_serve"], 0.95) or 0, 3),
            "live_write_p95_s": round(_percentile(split["write"], 0.95) or 0, 3),
            "live_stage_p95_ms": {
                stage: round(_percentile([t[stage] for t in self.timings if t.get(stage) is not None], 0.95) or 0, 1)
                for stage in ("fetch_ms", "decode_ms", "queue_wait_ms", "inference_ms", "batch_size")
            },
        }
        if bulk is not None:
            bulk.pop("window")
            phase["backfill"] = bulk
        return phase

    def run(self) -> dict[str, Any]:
        n = self.args.objects
        report: dict[str, Any] = {"objects": n, "live_rate_per_s": self.args.live_rate}
        # Warm: one upload and one small backfill, so that no phase pays a first call.
        self.live_phase("warm", 3, None)
        self.backfill(self.stage("warm", 16), Priority.BULK)
        self.clear()

        report["live_alone"] = self.live_phase("alone", self.args.live_seconds, None)
        self.clear()
        self.progress(f"bulk alone: {n} objects")
        source = self.stage("alone", n)
        report["bulk_alone"] = self.backfill(source, Priority.BULK)
        report["bulk_alone"].pop("window")
        self.clear()
        source = self.stage("beside", n)
        report["live_beside_bulk"] = self.live_phase("beside-bulk", None, lambda: self.backfill(source, Priority.BULK))
        self.clear()
        if not self.args.no_compare:
            source = self.stage("as-live", n)
            report["live_beside_live_backfill"] = self.live_phase(
                "beside-live-backfill", None, lambda: self.backfill(source, Priority.LIVE)
            )
            self.clear()
        alone = report["live_alone"]["live_p95_s"]
        report["ratios"] = {
            "live_p95_beside_bulk_over_alone": round(report["live_beside_bulk"]["live_p95_s"] / alone, 2),
            "backfill_rate_beside_live_over_alone": round(
                report["live_beside_bulk"]["backfill"]["images_per_s"] / report["bulk_alone"]["images_per_s"], 2
            ),
        }
        if "live_beside_live_backfill" in report:
            report["ratios"]["live_p95_beside_live_backfill_over_alone"] = round(
                report["live_beside_live_backfill"]["live_p95_s"] / alone, 2
            )
        return report


class _QuietSink:
    def status(self, text: str) -> None: ...
    def start(self, total: int) -> None: ...
    def update(self, done: int, published: int, classes: str = "") -> None: ...


def format_report(report: dict[str, Any]) -> str:
    lines = [f"live uploads at {report['live_rate_per_s']}/s; backfills of {report['objects']} objects", ""]
    lines.append(
        f"{'phase':34} {'live n':>7} {'p50 s':>7} {'p95 s':>7} {'in Serve p50/p95':>17} "
        f"{'backfill img/s':>15} {'shed live/bulk':>15}"
    )
    for key, label in (
        ("live_alone", "live alone"),
        ("bulk_alone", "bulk alone"),
        ("live_beside_bulk", "live beside a bulk backfill"),
        ("live_beside_live_backfill", "live beside a live backfill"),
    ):
        phase = report.get(key)
        if phase is None:
            continue
        bulk = phase if key == "bulk_alone" else phase.get("backfill")
        shed = bulk["serve_shed_inputs"] if bulk else {}
        lines.append(
            f"{label:34} {phase.get('live_uploads', '-'):>7} {phase.get('live_p50_s', '-'):>7} "
            f"{phase.get('live_p95_s', '-'):>7} "
            f"{str(phase.get('live_in_serve_p50_s', '-')) + '/' + str(phase.get('live_in_serve_p95_s', '-')):>17} "
            f"{bulk['images_per_s'] if bulk else '-':>15} "
            f"{str(shed.get('live', '-')) + '/' + str(shed.get('bulk', '-')) if bulk else '-':>15}"
        )
    lines += ["", f"{'live p95 by part, s':34} {'before Serve':>13} {'in Serve':>9} {'write':>7}"]
    for key, label in (("live_alone", "live alone"), ("live_beside_bulk", "live beside a bulk backfill"),
                       ("live_beside_live_backfill", "live beside a live backfill")):  # fmt: skip
        phase = report.get(key)
        if phase is not None:
            lines.append(
                f"{label:34} {phase['live_before_serve_p95_s']:>13} {phase['live_in_serve_p95_s']:>9} "
                f"{phase['live_write_p95_s']:>7}"
            )
    lines.append("")
    for name, value in report["ratios"].items():
        lines.append(f"{name}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=3000, help="objects per backfill")
    parser.add_argument("--live-rate", type=float, default=2.0, help="live uploads per second")
    parser.add_argument("--live-seconds", type=float, default=30.0, help="length of the live-alone phase")
    parser.add_argument("--no-compare", action="store_true", help="skip the phase with a backfill sent as live")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE",
        help="a setting for the stack's processes, e.g. TRIGGERFISH_BULK_BATCH_WHILE_LIVE=0.125 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the report as JSON here")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(settings) != len(args.env):
        parser.error(f"--env takes NAME=VALUE, got {args.env}")
    progress = (lambda m: None) if args.json else (lambda m: print(f"... {m}", file=sys.stderr, flush=True))
    stack = LocalStack(StackOptions(
        state_dir=Path(tempfile.mkdtemp(prefix="triggerfish-live-bulk-")),
        extra_env={
            "TRIGGERFISH_ALLOWED_BUCKETS": f"triggerfish-images,{ARCHIVE_BUCKET}", "TRIGGERFISH_MODELS": MODEL,
            **settings,
        },
    ))  # fmt: skip
    state = stack.start(progress=progress)
    try:
        StackClient(state).storage.create_bucket(ARCHIVE_BUCKET)
        report = LiveBulkBench(state, args, progress).run()
        report["settings"] = settings
    finally:
        progress("stopping the local stack")
        stack.stop()
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
