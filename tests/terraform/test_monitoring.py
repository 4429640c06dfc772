"""Observability: Managed Prometheus scrapes the Ray pods; alerts cover dead letters, function
errors and Serve's error rate and p95 latency."""

from __future__ import annotations

from tests.terraform._hcl import block, child, expr, root

#: Names the Serve application exports (through Ray's metrics agent on port 8080).
REQUESTS_TOTAL = "ray_triggerfish_requests_total"
DURATION_BUCKETS = "ray_triggerfish_request_duration_seconds_bucket"


def _policy(name):
    return child("monitoring").resource("google_monitoring_alert_policy", name)


def _conditions(name):
    return _policy(name)["conditions"]


def test_the_root_wires_the_monitoring_module():
    call = root().module_calls["monitoring"]
    assert call["dead_letter_subscription"] == '${module.pubsub.subscription_names["dead_letter"]}'
    assert call["function_service_names"] == "${values(module.functions.names)}"
    assert call["namespace"] == "${module.ray.namespace}"
    assert call["notification_channels"] == "${var.alert_notification_channels}"


def test_pod_monitoring_is_applied_from_infra_k8s():
    manifest = child("monitoring").resource("kubectl_manifest", "pod_monitoring")
    assert '${var.manifests_dir}/podmonitoring.yaml"' in manifest["yaml_body"]


def test_dead_letter_backlog_alerts_on_count_and_age():
    metrics = set()
    for condition in _conditions("dead_letters"):
        threshold = block(condition, "condition_threshold")
        assert (
            'resource.labels.subscription_id = \\"${var.dead_letter_subscription}\\"'
            in (threshold["filter"])
        )
        metrics.add(threshold["filter"].split('metric.type = \\"')[1].split("\\")[0])
        assert threshold["comparison"] == "COMPARISON_GT"
    assert metrics == {
        "pubsub.googleapis.com/subscription/num_undelivered_messages",
        "pubsub.googleapis.com/subscription/oldest_unacked_message_age",
    }
    assert _policy("dead_letters")["combiner"] == "OR"


def test_function_errors_alert_on_5xx_of_the_functions_services():
    (condition,) = _conditions("function_errors")
    threshold = block(condition, "condition_threshold")
    assert 'metric.type = \\"run.googleapis.com/request_count\\"' in threshold["filter"]
    assert 'metric.labels.response_code_class = \\"5xx\\"' in threshold["filter"]
    assert "${local.function_services}" in threshold["filter"]
    assert "var.function_service_names" in child("monitoring").locals["function_services"]


def test_serve_error_rate_and_latency_are_promql_over_the_app_metrics():
    module = child("monitoring")
    (errors,) = _conditions("serve_errors")
    assert block(errors, "condition_prometheus_query_language")["query"] == (
        "${local.serve_error_ratio}"
    )
    ratio = expr(module.locals["serve_error_ratio"])
    assert ratio.count(REQUESTS_TOTAL) == 2
    assert 'status!=\\"ok\\"' in ratio
    (latency,) = _conditions("serve_latency")
    assert block(latency, "condition_prometheus_query_language")["query"] == "${local.serve_p95}"
    p95 = expr(module.locals["serve_p95"])
    assert "histogram_quantile(0.95" in p95
    assert DURATION_BUCKETS in p95


def test_every_alert_goes_to_the_configured_channels_and_explains_itself():
    module = child("monitoring")
    policies = module.resources["google_monitoring_alert_policy"]
    assert set(policies) == {"dead_letters", "function_errors", "serve_errors", "serve_latency"}
    for name, policy in policies.items():
        assert policy["notification_channels"] == "${var.notification_channels}", name
        assert block(policy, "documentation")["content"], name
