"""Terraform takes names and delivery settings from infra/footprint.json, like the local stack."""

from __future__ import annotations

import json
import re

import pytest

from tests.terraform._hcl import FOOTPRINT, TF_ROOT, all_modules, child, expr, root


@pytest.fixture(scope="module")
def footprint():
    return json.loads(FOOTPRINT.read_text())


def _names(footprint):
    yield from footprint["topics"].values()
    yield from (sub["name"] for sub in footprint["subscriptions"].values())
    yield from footprint["buckets"].values()


def test_root_reads_footprint_json_relative_to_the_module():
    assert expr(root().locals["footprint"]) == expr(
        '${jsondecode(file("${path.module}/../infra/footprint.json"))}'
    )
    assert (TF_ROOT / ".." / "infra" / "footprint.json").resolve() == FOOTPRINT.resolve()


def test_no_footprint_name_is_spelled_out_in_terraform(footprint):
    """Names can only come from the file, so they cannot drift from the local stack."""
    for module in all_modules():
        for name in _names(footprint):
            assert not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", module.text), (
                f"{module.path.name} spells out {name!r}; read it from local.footprint"
            )


def test_bucket_names_are_project_prefixed_footprint_names(footprint):
    top = root()
    assert expr(top.locals["bucket_names"]) == expr(
        '${{for key, name in local.footprint.buckets : key => "${var.project_id}-${name}"}}'
    )
    buckets = top.module_calls["storage"]["buckets"]
    for key in footprint["buckets"]:
        assert buckets[key]["name"] == f"${{local.bucket_names.{key}}}", key


def test_topics_and_subscriptions_come_from_the_footprint(footprint):
    call = root().module_calls["pubsub"]
    assert "local.footprint.topics" in call["topics"]
    assert call["dead_letter_topic"]["name"] == "${local.footprint.topics.dead_letter}"
    dead = call["dead_letter_subscription"]
    for field in ("name", "ack_deadline_seconds", "message_retention_seconds"):
        assert dead[field] == f"${{local.footprint.subscriptions.dead_letter.{field}}}"
    push = expr(call["push_subscriptions"])
    assert push.startswith("${{forkey,subinlocal.function_subscriptions:"), push
    for field in (
        "name",
        "topic",
        "ack_deadline_seconds",
        "min_backoff_seconds",
        "max_backoff_seconds",
        "max_delivery_attempts",
    ):
        assert f"{field}=sub.{field}" in push, f"push subscription {field} must come from footprint"


def test_function_subscriptions_are_the_footprint_entries_with_an_entry_point(footprint):
    top = root()
    assert "local.footprint.subscriptions" in top.locals["function_subscriptions"]
    assert 'lookup(sub, "entry_point", null)' in top.locals["function_subscriptions"]
    functions = expr(top.module_calls["functions"]["functions"])
    assert "entry_point=sub.entry_point" in functions
    assert "timeout_seconds=sub.ack_deadline_seconds-local.function_timeout_margin_s" in functions
    with_entry_point = {k for k, s in footprint["subscriptions"].items() if "entry_point" in s}
    assert with_entry_point == {"requests", "uploads"}


def test_footprint_settings_satisfy_the_pubsub_module_validations(footprint):
    """The bounds enforced by modules/pubsub hold for the values the footprint feeds it."""
    validations = " ".join(
        v["condition"] for v in child("pubsub").variables["push_subscriptions"]["validation"]
    )
    assert "s.max_delivery_attempts >= 5 && s.max_delivery_attempts <= 100" in validations
    assert "s.ack_deadline_seconds >= 10 && s.ack_deadline_seconds <= 600" in validations
    for key, sub in footprint["subscriptions"].items():
        if "entry_point" not in sub:
            continue
        assert 5 <= sub["max_delivery_attempts"] <= 100, key
        assert 10 <= sub["ack_deadline_seconds"] <= 600, key
        assert 0 <= sub["min_backoff_seconds"] <= sub["max_backoff_seconds"] <= 600, key


def test_request_timeout_default_fits_every_ack_deadline(footprint):
    """Serve timeout < function timeout < ack deadline, as the functions module checks at plan time."""
    top = root()
    default = top.variables["request_timeout_s"]["default"]
    margin = top.locals["function_timeout_margin_s"]
    assert margin > 0
    for key, sub in footprint["subscriptions"].items():
        if "entry_point" in sub:
            function_timeout = sub["ack_deadline_seconds"] - margin
            assert default < function_timeout < sub["ack_deadline_seconds"], key
    precondition = child("functions").resource("google_cloudfunctions2_function", "this")[
        "lifecycle"
    ][0]["precondition"][0]
    assert expr(precondition["condition"]) == expr(
        "${var.request_timeout_s < each.value.timeout_seconds}"
    )


#: A scale-from-zero cold start of a model replica, worst case, in seconds (terraform/README.md,
#: "Delivery and cold starts"): GPU node creation and driver installation (~8 min), the Ray
#: worker start with a streamed image (~2 min), engine build on a cache miss (~5 min).
COLD_START_S = 15 * 60


def _backoffs(sub):
    """Pub/Sub's delays between attempts: exponential from the minimum, capped at the maximum."""
    delay, delays = sub["min_backoff_seconds"], []
    for _ in range(sub["max_delivery_attempts"] - 1):
        delays.append(min(delay, sub["max_backoff_seconds"]))
        delay *= 2
    return delays


def test_retries_outlast_a_scale_from_zero_cold_start(footprint):
    """Even when every attempt fails at once, the message is not dead-lettered before a cold
    start has finished, with room to spare (twice the worst case)."""
    for key, sub in footprint["subscriptions"].items():
        if "entry_point" in sub:
            assert sum(_backoffs(sub)) >= 2 * COLD_START_S, key
