"""Draw ``infra/grafana/triggerfish.json`` from a Prometheus server, without Grafana.

Every panel's PromQL is evaluated by the Prometheus HTTP API (``query_range`` for
time series, ``query`` for instant tables and bar gauges) with Grafana's variables
filled in (``$__rate_interval``, ``$__range``, ``$model`` = all), and drawn with
matplotlib on the dashboard's grid. It shows what the dashboard shows; it does not
imitate every Grafana option.

``python -m infra.grafana.render config`` prints a Prometheus configuration that
scrapes the running local stack; ``python -m infra.grafana.render render`` draws
the PNG (needs ``pip install matplotlib``).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
DASHBOARD = HERE / "triggerfish.json"
# Grafana's dark theme.
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#705da0")
PX_PER_COLUMN, PX_PER_ROW, DPI = 80, 30, 100


def prometheus_config(metrics_url: str, interval_s: int = 5) -> str:
    """A Prometheus configuration scraping ``metrics_url`` (``http://host:port/metrics``)."""
    target = re.sub(r"^https?://", "", metrics_url).split("/", 1)[0]
    return (
        "global:\n"
        f"  scrape_interval: {interval_s}s\n"
        "scrape_configs:\n"
        "  - job_name: triggerfish-local\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )


def expand(expr: str, rate_interval: str, range_s: float) -> str:
    """Grafana's variables as the dashboard's defaults set them (every model)."""
    return (
        expr.replace("$__rate_interval", rate_interval)
        .replace("$__range", f"{int(range_s)}s")
        .replace('=~"$model"', '=~".*"')
    )


def legend(template: str, labels: dict[str, str]) -> str:
    if not template:
        return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


class Prometheus:
    def __init__(self, url: str) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=30)

    def _get(self, path: str, **params: Any) -> list[dict[str, Any]]:
        answer = self._http.get(path, params=params).json()
        if answer.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {params.get('query')!r}: {answer.get('error')}")
        return answer["data"]["result"]

    def range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query_range", query=expr, start=start, end=end, step=step)

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return self._get("/api/v1/query", query=expr, time=at)


def _format(unit: str, value: float) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2g} s"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    return f"{value:.3g}"


def _timeseries(
    ax: Any, panel: dict[str, Any], prom: Prometheus, window: tuple[float, float, float], rate: str
) -> None:
    from matplotlib.dates import DateFormatter
    from matplotlib.ticker import FuncFormatter

    start, end, step = window
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    stacked = (
        panel.get("fieldConfig", {})
        .get("defaults", {})
        .get("custom", {})
        .get("stacking", {})
        .get("mode")
        == "normal"
    )
    series = []
    for target in panel["targets"]:
        for result in prom.range(expand(target["expr"], rate, end - start), start, end, step):
            points = [
                (round(float(t), 3), float(v))
                for t, v in result["values"]
                if math.isfinite(float(v))
            ]
            if points:
                series.append((legend(target.get("legendFormat", ""), result["metric"]), points))
    if not series:
        ax.text(
            0.5,
            0.5,
            "No data",
            ha="center",
            va="center",
            color=TEXT,
            transform=ax.transAxes,
            alpha=0.6,
        )
    times = [datetime.fromtimestamp(t) for t in _grid(start, end, step)]
    bottom = [0.0] * len(times)
    for i, (name, points) in enumerate(sorted(series)):
        by_time = dict(points)
        values = [by_time.get(t, math.nan) for t in _grid(start, end, step)]
        color = PALETTE[i % len(PALETTE)]
        if stacked:
            filled = [0.0 if math.isnan(v) else v for v in values]
            top = [b + v for b, v in zip(bottom, filled, strict=True)]
            ax.fill_between(times, bottom, top, color=color, alpha=0.35, linewidth=0)
            ax.plot(times, top, color=color, linewidth=1.4, label=name)
            bottom = top
        else:
            ax.plot(times, values, color=color, linewidth=1.6, label=name)
            ax.fill_between(
                times, 0, [0 if math.isnan(v) else v for v in values], color=color, alpha=0.08
            )
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _format(unit, v)))
    ax.xaxis.set_major_formatter(DateFormatter("%H:%M"))
    ax.grid(color=GRID, linewidth=0.6)
    if series:
        ax.legend(
            loc="upper left", fontsize=7, frameon=True, facecolor=PANEL, edgecolor=PANEL,
            framealpha=0.85, labelcolor=TEXT, ncol=min(3, len(series)),
        )  # fmt: skip


def _grid(start: float, end: float, step: float) -> list[float]:
    count = int(round((end - start) / step)) + 1
    return [round(start + i * step, 3) for i in range(count)]


def _bars(
    ax: Any, panel: dict[str, Any], prom: Prometheus, window: tuple[float, float, float], rate: str
) -> None:
    start, end, _ = window
    [target] = panel["targets"]
    cumulative = sorted(
        (float(r["metric"].get("le", "inf")), float(r["value"][1]))
        for r in prom.instant(expand(target["expr"], rate, end - start), end)
    )
    counts = [c - (cumulative[i - 1][1] if i else 0.0) for i, (_, c) in enumerate(cumulative)]
    last = max((i for i, c in enumerate(counts) if c > 0.5), default=-1)
    shown = list(zip([le for le, _ in cumulative], counts, strict=True))[: last + 2]
    if not shown:
        ax.text(
            0.5,
            0.5,
            "No data",
            ha="center",
            va="center",
            color=TEXT,
            transform=ax.transAxes,
            alpha=0.6,
        )
        return
    names = [f"≤{le:g}" if math.isfinite(le) else f">{cumulative[-2][0]:g}" for le, _ in shown]
    ax.bar(names, [c for _, c in shown], color=PALETTE[0], alpha=0.85)
    for x, (_, c) in enumerate(shown):
        ax.text(x, c, f"{c:.0f}", ha="center", va="bottom", color=TEXT, fontsize=8)
    ax.set_xlabel("images per execution", color=TEXT, fontsize=8)
    ax.grid(axis="y", color=GRID, linewidth=0.6)


def _table(
    ax: Any, panel: dict[str, Any], prom: Prometheus, window: tuple[float, float, float], rate: str
) -> None:
    start, end, _ = window
    [target] = panel["targets"]
    rows = sorted(
        tuple(r["metric"].get(k, "") for k in ("model", "version", "backend"))
        for r in prom.instant(expand(target["expr"], rate, end - start), end)
    )
    ax.axis("off")
    if not rows:
        ax.text(
            0.5,
            0.5,
            "No data",
            ha="center",
            va="center",
            color=TEXT,
            transform=ax.transAxes,
            alpha=0.6,
        )
        return
    table = ax.table(
        cellText=rows, colLabels=["model", "version", "backend"], loc="upper center", cellLoc="left"
    )
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.6)
    for (row, _), cell in table.get_celld().items():
        cell.set_edgecolor(GRID)
        cell.set_facecolor(PANEL if row else "#22252b")
        cell.get_text().set_color(TEXT)


DRAW = {"timeseries": _timeseries, "bargauge": _bars, "table": _table}


def render(
    dashboard: dict[str, Any], prom: Prometheus, out: Path, minutes: float, end: float, rate: str
) -> None:
    """Draw every panel of ``dashboard`` over the last ``minutes`` before ``end`` into ``out``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise SystemExit("drawing the dashboard needs matplotlib: pip install matplotlib") from err

    step = float(max(5, round(minutes * 60 / 240)))
    end = math.floor(end / step) * step  # Prometheus answers on this grid: keys match exactly
    start = end - math.floor(minutes * 60 / step) * step
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in dashboard["panels"])
    header_px, width_px = 64, 24 * PX_PER_COLUMN
    height_px = header_px + rows * PX_PER_ROW
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor=BACKGROUND)
    stamp = f"{datetime.fromtimestamp(start):%Y-%m-%d %H:%M} to {datetime.fromtimestamp(end):%H:%M}"
    fig.text(
        0.006,
        1 - 22 / height_px,
        f"{dashboard['title']}   ·   {stamp}",
        color=TEXT,
        fontsize=13,
        weight="bold",
    )
    fig.text(
        0.006, 1 - 46 / height_px,
        "Panels of infra/grafana/triggerfish.json, their PromQL evaluated by Prometheus 2.42 scraping the local stack, "
        "drawn by infra/grafana/render.py with matplotlib (Grafana itself was not available here).",
        color=TEXT, fontsize=8.5, alpha=0.75,
    )  # fmt: skip
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        pad = 4
        left, width = (
            (g["x"] * PX_PER_COLUMN + pad) / width_px,
            (g["w"] * PX_PER_COLUMN - 2 * pad) / width_px,
        )
        top = header_px + g["y"] * PX_PER_ROW + pad
        height = g["h"] * PX_PER_ROW - 2 * pad
        frame = fig.add_axes((left, 1 - (top + height) / height_px, width, height / height_px))
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(GRID)
        frame.text(
            0.012,
            0.95,
            panel["title"],
            color=TEXT,
            fontsize=10,
            weight="bold",
            va="top",
            transform=frame.transAxes,
        )
        inner = fig.add_axes(
            (
                left + 52 / width_px,
                1 - (top + height - 30) / height_px,
                width - 64 / width_px,
                (height - 64) / height_px,
            )
        )
        inner.set_facecolor(PANEL)
        inner.tick_params(colors=TEXT, labelsize=7.5)
        for spine in inner.spines.values():
            spine.set_visible(False)
        DRAW[panel["type"]](inner, panel, prom, (start, end, step), rate)
    fig.savefig(out, facecolor=BACKGROUND)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    config = sub.add_parser(
        "config", help="print a Prometheus configuration scraping the local stack"
    )
    config.add_argument("--metrics-url", help="default: the running local stack's")
    draw = sub.add_parser("render", help="draw the dashboard into a PNG")
    draw.add_argument("--prometheus", default="http://127.0.0.1:9090")
    draw.add_argument("--dashboard", type=Path, default=DASHBOARD)
    draw.add_argument("--minutes", type=float, default=15)
    draw.add_argument("--end", type=float, default=None, help="epoch seconds (default: now)")
    draw.add_argument("--rate-interval", default="1m", help="what $__rate_interval stands for")
    draw.add_argument("--out", type=Path, default=HERE / "screenshot.png")
    args = parser.parse_args(argv)
    if args.command == "config":
        url = args.metrics_url
        if not url:
            from infra.local.stack import DEFAULT_STATE_DIR, StackState

            url = StackState.load(DEFAULT_STATE_DIR).metrics_url
        sys.stdout.write(prometheus_config(url))
        return 0
    dashboard = json.loads(args.dashboard.read_text())
    render(
        dashboard,
        Prometheus(args.prometheus),
        args.out,
        args.minutes,
        args.end or time.time(),
        args.rate_interval,
    )
    sys.stdout.write(f"{args.out}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
