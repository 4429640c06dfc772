"""Per-model figures for ``triggerfish status``, from one scrape of the stack's metrics.

Throughput is the change of the images counter since the previous ``status`` (the
scrape is remembered in the state directory), or the average since the stack
started on the first call.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "ray_triggerfish_"
SNAPSHOT = "metrics-snapshot.json"


@dataclass
class ModelFigures:
    """What ``status`` shows for one model (sums over replicas and versions)."""

    images: float = 0.0
    executions: float = 0.0
    ok: float = 0.0
    errors: float = 0.0
    errors_by_reason: dict[str, float] = field(default_factory=dict)
    shed: float = 0.0
    queue_depth: float = 0.0
    images_per_s: float | None = None

    @property
    def average_batch(self) -> float | None:
        return self.images / self.executions if self.executions else None


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` of every ``ray_triggerfish_*`` sample in a Prometheus scrape."""
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(PREFIX)
    ]


def figures(scraped: list[tuple[str, dict[str, str], float]]) -> dict[str, ModelFigures]:
    """Per-model totals from :func:`samples`; counters are summed over replicas and versions."""
    models: dict[str, ModelFigures] = defaultdict(ModelFigures)
    for name, labels, value in scraped:
        model = labels.get("model")  # "*": not attributable to a served model
        if not model:
            continue
        f = models[model]
        metric = name.removeprefix(PREFIX)
        if metric == "inference_count_total":
            f.images += value
        elif metric == "execution_count_total":
            f.executions += value
        elif metric == "requests_total":
            if labels.get("status") == "ok":
                f.ok += value
            else:
                f.errors += value
        elif metric == "errors_total":
            reason = labels.get("reason", "?")
            f.errors_by_reason[reason] = f.errors_by_reason.get(reason, 0.0) + value
        elif metric == "load_shed_total":
            f.shed += value
        elif metric == "queue_depth":
            f.queue_depth += value
    return dict(models)


def model_figures(
    metrics_url: str, state_dir: Path, started_at: float, now: float | None = None
) -> dict[str, ModelFigures]:
    """Scrape ``metrics_url`` and add throughput against the previous scrape.

    Raises:
        httpx.HTTPError: the metrics endpoint does not answer.
    """
    now = time.time() if now is None else now
    response = httpx.get(metrics_url, timeout=5)
    response.raise_for_status()
    models = figures(samples(response.text))
    path = state_dir / SNAPSHOT
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        previous = {}
    before = previous.get("images", {})
    for model, f in models.items():
        if model in before and f.images >= before[model]:
            done, elapsed = f.images - before[model], now - previous["at"]
        else:  # the first look, or a replica restarted and its counters with it
            done, elapsed = f.images, now - started_at
        f.images_per_s = done / elapsed if elapsed > 0 else None
    path.write_text(json.dumps({"at": now, "images": {m: f.images for m, f in models.items()}}))
    return models


def as_json(models: dict[str, ModelFigures]) -> dict[str, dict]:
    return {m: {**asdict(f), "average_batch": f.average_batch} for m, f in models.items()}


def table(models: dict[str, ModelFigures]) -> list[str]:
    """The lines ``status`` prints."""
    header = f"{'model':16} {'images/s':>9} {'images':>8} {'avg batch':>9} {'queue':>6} {'ok':>7} {'errors':>7}  by reason"
    lines = [header]
    for model, f in sorted(models.items()):
        rate = f"{f.images_per_s:.2f}" if f.images_per_s is not None else "-"
        batch = f"{f.average_batch:.2f}" if f.average_batch is not None else "-"
        reasons = ", ".join(f"{r}={v:g}" for r, v in sorted(f.errors_by_reason.items())) or "-"
        if f.shed:
            reasons += f"; shed={f.shed:g}"
        lines.append(
            f"{model:16} {rate:>9} {f.images:>8g} {batch:>9} {f.queue_depth:>6g} {f.ok:>7g} {f.errors:>7g}  {reasons}"
        )
    return lines
