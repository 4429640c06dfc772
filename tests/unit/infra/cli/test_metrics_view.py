"""``triggerfish status``'s per-model figures from a recorded scrape of the local stack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from infra.cli import metrics_view as _metrics_view
from infra.cli.metrics_view import figures, model_figures, samples, table

# A real scrape of the local stack after a few minutes of mixed traffic (histogram
# buckets left out), with a few of Ray's own series that must be ignored.
SCRAPE = (Path(__file__).resolve().parents[3] / "data" / "ray_metrics_scrape.txt").read_text()


def test_figures_sum_over_replicas_and_versions() -> None:
    models = figures(samples(SCRAPE))

    mobilenet = models["mobilenet_v2"]
    assert (mobilenet.images, mobilenet.executions) == (9089, 4800)
    assert mobilenet.average_batch == pytest.approx(9089 / 4800)
    assert (mobilenet.ok, mobilenet.errors) == (6757, 786)
    assert mobilenet.errors_by_reason == {"not_an_image": 403, "object_missing": 383}
    assert models["text_detector"].errors == 0
    assert models["*"].shed == 2459  # shed at the ingress, before any model was chosen
    assert all(name.startswith("ray_triggerfish_") for name, _, _ in samples(SCRAPE))


def _serve(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    def get(url: str, timeout: float) -> httpx.Response:
        return httpx.Response(200, text=text, request=httpx.Request("GET", url))

    monkeypatch.setattr(_metrics_view.httpx, "get", get)


def test_throughput_is_the_average_first_then_the_rate_since_the_last_look(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _serve(monkeypatch, SCRAPE)
    first = model_figures("http://x/metrics", tmp_path, started_at=1000.0, now=1100.0)
    assert first["mobilenet_v2"].images_per_s == pytest.approx(90.89)

    _serve(monkeypatch, _bump_images(SCRAPE, "mobilenet_v2", 100))
    second = model_figures("http://x/metrics", tmp_path, started_at=1000.0, now=1110.0)
    assert second["mobilenet_v2"].images_per_s == pytest.approx(10.0)
    assert second["text_detector"].images_per_s == 0


def _bump_images(text: str, model: str, extra: float) -> str:
    """The scrape with ``extra`` more images counted for ``model`` (on its first series)."""
    out, done = [], False
    for line in text.splitlines():
        if (
            not done
            and line.startswith("ray_triggerfish_inference_count_total{")
            and f'model="{model}"' in line
        ):
            head, value = line.rsplit(" ", 1)
            line, done = f"{head} {float(value) + extra}", True
        out.append(line)
    return "\n".join(out) + "\n"


def test_the_table_shows_one_row_per_model() -> None:
    lines = table(figures(samples(SCRAPE)))

    assert lines[0].split()[:3] == ["model", "images/s", "images"]
    row = next(line for line in lines if line.startswith("mobilenet_v2"))
    assert "9089" in row and "1.89" in row and "not_an_image=403" in row
    assert any(line.startswith("*") and "shed=2459" in line for line in lines)


def test_an_unreachable_endpoint_raises_for_the_caller(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(url: str, timeout: float) -> Any:
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(_metrics_view.httpx, "get", refuse)
    with pytest.raises(httpx.HTTPError):
        model_figures("http://x/metrics", tmp_path, started_at=0.0)
