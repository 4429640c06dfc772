"""``triggerfish demo`` / ``make demo``: sample photos through all three entry paths.

Starts the local stack (unless one is up), uploads the sample photos (bucket
upload path), publishes request messages for some of them (Pub/Sub path),
calls Serve directly (HTTP path), prints one table row per result, and stops
what it started.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from infra.local.client import StackClient
from infra.local.running import stack_for_command

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
UPLOADS = ("cat.jpg", "coffee.jpg", "astronaut.jpg", "rocket.jpg", "text.jpg")
PUBLISHED = (("coffee.jpg", "mobilenet_v2"), ("astronaut.jpg", "mobilenet_v2"), ("text.jpg", "text_detector"))
HTTP_FILES = ("cat.jpg",)
HTTP_URIS = ("rocket.jpg",)


@dataclass
class Row:
    entry_path: str
    image: str
    model: str
    status: str
    top: str
    score: float | None
    latency_ms: float
    result_uri: str | None


def _row(entry: str, image: str, result: dict[str, Any], latency_s: float) -> Row:
    model = result.get("model", {})
    if result.get("status") != "ok":
        err = result.get("error") or {}
        top, score = f"{err.get('reason')}: {err.get('message')}", None
    elif result.get("labels"):
        top, score = result["labels"][0]["label"], result["labels"][0]["score"]
    else:
        found = result.get("detections") or []
        best = max((d["score"] for d in found), default=None)
        top, score = f"{len(found)} x {found[0]['label'] if found else 'nothing'}", best
    return Row(
        entry, image, f"{model.get('name')}:{model.get('version')}", result.get("status", "?"),
        top, score, round(latency_s * 1000, 1), result.get("result_uri"),
    )  # fmt: skip


def run_demo(client: StackClient) -> list[Row]:
    rows: list[Row] = []
    pending = []
    for name in UPLOADS:
        started = time.monotonic()
        uri, generation = client.upload(SAMPLES / name)
        pending.append((name, str(uri), generation, started))
    for name, uri, generation, started in pending:
        result = client.wait_result(uri, 120, generation=generation)
        rows.append(_row("upload", name, result, time.monotonic() - started))
    for name, model in PUBLISHED:
        uri = f"gs://{client.state.images_bucket}/{name}"
        started = time.monotonic()
        _, request_id = client.publish([uri], model=model)
        result = client.wait_result(uri, 120, model=model, request_id=request_id)
        rows.append(_row("pubsub", name, result, time.monotonic() - started))
    for name in HTTP_FILES:
        started = time.monotonic()
        result = client.infer(SAMPLES / name)["results"][0]
        rows.append(_row("http", name, result, time.monotonic() - started))
    for name in HTTP_URIS:
        started = time.monotonic()
        result = client.infer(f"gs://{client.state.images_bucket}/{name}")["results"][0]
        rows.append(_row("http", f"gs://.../{name}", result, time.monotonic() - started))
    return rows


def format_table(rows: list[Row]) -> str:
    headers = ("entry path", "image", "model", "top-1 / detections", "score", "latency ms", "result JSON")
    cells = [
        (r.entry_path, r.image, r.model, r.top[:40], f"{r.score:.3f}" if r.score is not None else "-",
         f"{r.latency_ms:.0f}", r.result_uri or "-")
        for r in rows
    ]  # fmt: skip
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*headers), line.format(*("-" * w for w in widths))]
    out += [line.format(*c) for c in cells]
    return "\n".join(out)


def cmd_demo(args: argparse.Namespace) -> int:
    with stack_for_command(quiet=args.json) as state:
        rows = run_demo(StackClient(state))
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
    else:
        print()
        print(format_table(rows))
        print("\nLatency is measured by the client: from upload/publish/POST until the result JSON was stored.")
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        print(f"triggerfish demo: {len(failed)} inputs failed", file=sys.stderr)
        return 1
    return 0
