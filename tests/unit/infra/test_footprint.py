"""infra/footprint.json read through infra.footprint: function settings, timeouts, cold start."""

from __future__ import annotations

import json

import pytest

from infra.footprint import FOOTPRINT_FILE, FootprintError, load_footprint


def _write(tmp_path, change):
    raw = json.loads(FOOTPRINT_FILE.read_text())
    change(raw)
    path = tmp_path / "footprint.json"
    path.write_text(json.dumps(raw))
    return path


def test_function_environment_is_threads_workers_and_the_wait_on_serve():
    fp = load_footprint()
    functions = fp.functions
    assert functions.environment() == {
        "THREADS": str(functions.request_concurrency),
        "WORKERS": "1",
        "TRIGGERFISH_REQUEST_TIMEOUT_S": str(functions.serve_wait_seconds),
    }
    sub = fp.requests_subscription
    assert (
        functions.timeout_seconds(sub)
        == sub.ack_deadline_seconds - functions.timeout_margin_seconds
    )


def test_serve_environment_is_its_request_deadline():
    fp = load_footprint()
    assert fp.serve_environment() == {
        "TRIGGERFISH_REQUEST_TIMEOUT_S": str(fp.serve_request_timeout_s)
    }


def test_the_shipped_timeouts_nest_from_the_ack_deadline_down():
    fp = load_footprint()
    for sub in (fp.requests_subscription, fp.uploads_subscription):
        assert (
            sub.ack_deadline_seconds
            > fp.functions.timeout_seconds(sub)
            > fp.functions.serve_wait_seconds
            > fp.serve_request_timeout_s
        )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["serve"].update(request_timeout_seconds=120), "serve.request_timeout_seconds"),
        (lambda r: r["functions"].update(serve_wait_seconds=150), "functions.serve_wait_seconds"),
        (
            lambda r: r["subscriptions"]["uploads"].update(ack_deadline_seconds=30),
            "the function timeout",
        ),
    ],
)
def test_timeouts_that_do_not_nest_are_refused(tmp_path, change, message):
    with pytest.raises(FootprintError, match=message):
        load_footprint(_write(tmp_path, change))


@pytest.mark.parametrize("bad", [0, -1, "64", True, 1.5])
def test_function_settings_must_be_positive_integers(tmp_path, bad):
    path = _write(tmp_path, lambda r: r["functions"].update(request_concurrency=bad))
    with pytest.raises(FootprintError, match="functions.request_concurrency"):
        load_footprint(path)


def test_cold_start_is_named_term_by_term():
    cold = load_footprint().cold_start
    assert list(cold.terms) == [
        "node_provision_seconds",
        "image_pull_seconds",
        "engine_from_cache_seconds",
    ]
    assert cold.total_seconds == sum(cold.terms.values())


def test_cold_start_terms_and_status_are_checked(tmp_path):
    renamed = _write(tmp_path, lambda r: r["cold_start"]["terms"].update(engine_build_seconds=300))
    with pytest.raises(FootprintError, match="cold_start.terms"):
        load_footprint(renamed)
    status = _write(tmp_path, lambda r: r["cold_start"].update(status="guess"))
    with pytest.raises(FootprintError, match="cold_start.status"):
        load_footprint(status)
