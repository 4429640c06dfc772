"""Terraform takes names and delivery settings from infra/footprint.json, like the local stack."""

from __future__ import annotations

import json
import re

import pytest

from infra.footprint import load_footprint
from tests.terraform._hcl import FOOTPRINT, TF_ROOT, all_modules, child, expr, footprint_value, root


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
    assert (
        "timeout_seconds=sub.ack_deadline_seconds-local.function_settings.timeout_margin_seconds"
        in functions
    )
    with_entry_point = {k for k, s in footprint["subscriptions"].items() if "entry_point" in s}
    assert with_entry_point == {"requests", "uploads", "bulk"}


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


def _function_settings(footprint):
    """The functions module's per-function settings as Terraform computes them."""
    functions = expr(root().module_calls["functions"]["functions"])
    settings = {}
    for field in (
        "max_instance_count",
        "max_instance_request_concurrency",
        "available_cpu",
        "available_memory",
    ):
        match = re.search(rf"{field}=(local\.function_settings\.[a-z_]+)", functions)
        assert match, f"{field} must come from local.function_settings"
        settings[field] = footprint_value("${" + match.group(1) + "}", footprint)
    return settings


def test_function_settings_come_from_the_footprint(footprint):
    assert root().locals["function_settings"] == "${local.footprint.functions}"
    settings = _function_settings(footprint)
    functions = load_footprint().functions
    assert settings == {
        "max_instance_count": functions.max_instances,
        "max_instance_request_concurrency": functions.request_concurrency,
        "available_cpu": functions.available_cpu,
        "available_memory": functions.available_memory,
    }
    for name in ("request_timeout_s", "function_concurrency", "function_max_instances"):
        assert name not in root().variables, (
            f"{name} would let the cloud drift from the local stack"
        )


def test_terraform_sets_the_function_environment_the_local_stack_sets(footprint):
    """THREADS (= request concurrency), WORKERS and the wait on Serve: Terraform's values,
    evaluated from the parsed configuration, equal FunctionSettings.environment(), which the
    local stack sets on its functions-framework processes (tests/unit/infra/local)."""
    env = root().module_calls["functions"]["environment_variables"]
    expected = load_footprint().functions.environment()
    assert {name: footprint_value(env[name], footprint) for name in expected} == expected
    assert expected["THREADS"] == str(
        _function_settings(footprint)["max_instance_request_concurrency"]
    )


def _timeout_chain(footprint, sub):
    """(name, seconds) from the outside in, each value read from what Terraform configures."""
    call = root().module_calls["functions"]
    margin = footprint_value("${local.function_settings.timeout_margin_seconds}", footprint)
    return [
        ("ack deadline", sub["ack_deadline_seconds"]),
        ("function timeout", sub["ack_deadline_seconds"] - margin),
        ("function wait on Serve", footprint_value(call["request_timeout_s"], footprint)),
        (
            "Serve request timeout",
            footprint_value("${local.footprint.serve.request_timeout_seconds}", footprint),
        ),
    ]


def test_timeouts_nest_from_the_ack_deadline_down(footprint):
    """ack deadline > function timeout > the function's wait on Serve > Serve's own timeout,
    as Terraform configures them; the RayService test checks Serve gets the last one."""
    top = root()
    assert (
        top.locals["serve_request_timeout_s"] == "${local.footprint.serve.request_timeout_seconds}"
    )
    assert (
        top.module_calls["functions"]["serve_request_timeout_s"]
        == "${local.serve_request_timeout_s}"
    )
    assert top.module_calls["ray"]["serve_environment"]["request_timeout_s"] == (
        "${local.serve_request_timeout_s}"
    )
    for key, sub in footprint["subscriptions"].items():
        if "entry_point" not in sub:
            continue
        chain = _timeout_chain(footprint, sub)
        for (outer, outer_s), (inner, inner_s) in zip(chain, chain[1:], strict=False):
            assert outer_s > inner_s, (
                f"{key}: {inner} ({inner_s}s) must be below {outer} ({outer_s}s)"
            )
    preconditions = child("functions").resource("google_cloudfunctions2_function", "this")[
        "lifecycle"
    ][0]["precondition"]
    conditions = {expr(p["condition"]) for p in preconditions}
    assert expr("${var.request_timeout_s < each.value.timeout_seconds}") in conditions
    assert expr("${var.serve_request_timeout_s < var.request_timeout_s}") in conditions


#: A scale-from-zero cold start of a model replica, term by term (footprint "cold_start":
#: node provision, image pull with streaming, engine from the GCS cache; terraform/README.md,
#: "Delivery and cold starts").
COLD_START_S = load_footprint().cold_start.total_seconds


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
