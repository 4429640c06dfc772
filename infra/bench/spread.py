"""The spread of several bench runs: the median, min and max of every figure a headline quotes.

One bench run on a shared machine is one sample; the docs quote the median of at least three
with their range. Each ``triggerfish bench --out FILE`` report is read, and for each image size
the ratios against the peer, Pub/Sub over HTTP, the CPU figures that carry to the cloud and each
path's ``ok`` images/s and CPU-ms per image are summarized::

    python -m infra.bench.spread run1.json run2.json run3.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SIZES = ("small", "large")


def _figures(report: dict[str, Any], size: str) -> dict[str, float]:
    """The named figures of one report for one image size (those it has)."""
    out: dict[str, float] = {}
    ratios = report.get("ratios", {}).get(size, {})
    for key, label in (("over_peer_reduced", "reduced-decode peer"), ("over_peer_full", "full-decode peer")):
        for path, value in ratios.get(key, {}).items():
            out[f"{path} / {label}"] = value
    for key in ("pubsub_1_uri_over_http", "serve_cpu_ms_upload", "peer_pipeline_cpu_ms_reduced"):
        if ratios.get(key) is not None:
            out[key] = ratios[key]
    for row in report.get(size, []):
        out[f"{row['path']}: images/s"] = row["images_per_s"]
        out[f"{row['path']}: CPU-ms per image"] = row["cpu_ms_per_image"]
    return out


def spread(reports: Iterable[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{size: {figure: {"median", "min", "max", "runs"}}}`` over the reports that have the figure."""
    reports = list(reports)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for size in SIZES:
        samples: dict[str, list[float]] = {}
        for report in reports:
            for name, value in _figures(report, size).items():
                samples.setdefault(name, []).append(value)
        if samples:
            out[size] = {
                name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": len(v)}
                for name, v in samples.items()
            }
    return out


def format_spread(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for size, figures in summary.items():
        lines.append(f"{size} JPEGs")
        width = max(len(name) for name in figures)
        for name, s in figures.items():
            lines.append(f"  {name:<{width}}  {s['median']:9.2f}  ({s['min']:.2f} to {s['max']:.2f}, {s['runs']} runs)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+", type=Path, help="reports written by triggerfish bench --out")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    reports = []
    for path in args.reports:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            sys.stderr.write(f"spread: cannot read the report {path}: {err}\n")
            return 1
    summary = spread(reports)
    sys.stdout.write((json.dumps(summary) if args.json else format_spread(summary)) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
