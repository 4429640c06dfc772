"""The swap-latency bench's arithmetic: which requests fall in the swap window, and the ratios."""

from __future__ import annotations

import pytest

from infra.bench.swap_latency import (
    Sample,
    format_report,
    parse_args,
    percentiles,
    split,
    summarize,
)


def test_requests_are_split_by_start_time_and_failures_and_warmup_left_out() -> None:
    samples = [
        Sample(1.0, 500.0, 200),  # warm-up
        Sample(5.0, 10.0, 200),
        Sample(30.0, 40.0, 200),  # first instant of the window
        Sample(59.9, 50.0, 200),
        Sample(60.0, 11.0, 200),  # window over
        Sample(31.0, 999.0, 503),  # failed: counted apart
    ]

    steady, swap = split(samples, warmup_s=3.0, swap_start_s=30.0, window_s=30.0)

    assert steady == [10.0, 11.0]
    assert swap == [40.0, 50.0]
    assert summarize(samples, 3.0, 30.0, 30.0)["failed_requests"] == 1


def test_ratios_compare_the_window_with_the_steady_state() -> None:
    samples = [Sample(float(t), 10.0, 200) for t in range(5, 30)] + [Sample(float(t), 15.0, 200) for t in range(30, 40)]

    report = summarize(samples, 3.0, 30.0, 10.0)

    assert report["steady"]["p99_ms"] == 10.0 and report["swap_window"]["p99_ms"] == 15.0
    assert report["p99_ratio"] == pytest.approx(1.5)


def test_percentiles_of_nothing_count_zero() -> None:
    assert percentiles([]) == {"count": 0}


def test_the_publish_must_fall_inside_the_run() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--duration-s", "20", "--publish-at-s", "30"])
    assert parse_args([]).duration_s == 90.0


def test_the_window_splits_at_the_promotion() -> None:
    samples = [Sample(float(t), 10.0, 200) for t in range(5, 30)]
    samples += [Sample(30.0 + t / 2, 20.0, 200) for t in range(10)]  # 30..34.5: loading
    samples += [Sample(35.0 + t, 12.0, 200) for t in range(25)]  # 35..59: promoted

    report = summarize(samples, 3.0, 30.0, 30.0, promoted_s=35.0)

    assert report["loading"]["count"] == 10 and report["loading"]["p99_ms"] == 20.0
    assert report["promoted"]["count"] == 25 and report["promoted"]["p99_ms"] == 12.0


def test_the_shape_defaults_to_one_node_direct_and_several_nodes_take_haproxy() -> None:
    one = parse_args([])
    assert (one.replicas, one.nodes, one.data_plane) == (1, 1, "direct")
    several = parse_args(["--replicas", "2", "--nodes", "2"])
    assert (several.replicas, several.nodes, several.data_plane) == (2, 2, "haproxy")
    assert parse_args(["--nodes", "2", "--data-plane", "proxy"]).data_plane == "proxy"


def test_a_control_run_reports_its_window_without_a_version() -> None:
    assert parse_args([]).control is False
    args = parse_args(["--control"])
    samples = [Sample(float(t), 10.0, 200) for t in range(5, 60)]
    report = summarize(samples, 3.0, 30.0, 30.0)
    report.update(
        clients=4, duration_s=60.0, published_at_s=30.0, promoted_after_s=None, window_s=30.0,
        versions=["1", None], control=args.control,
    )  # fmt: skip

    text = format_report(report)

    assert "no version published (control), the window from 30.0s" in text
    assert "swap/steady: p50 1.00x  p99 1.00x  p99.9 1.00x" in text
