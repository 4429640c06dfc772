"""Cloud Functions: entry points, environment, network, and retry on failure."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.terraform._hcl import FOOTPRINT, REPO_ROOT, block, child, expr, root

#: Exactly what functions/ reads (shared/config.py, and the ID token audience for Serve).
FUNCTION_ENV = {
    "TRIGGERFISH_SERVE_URL",
    "TRIGGERFISH_SERVE_AUDIENCE",
    "TRIGGERFISH_RESULTS_BUCKET",
    "TRIGGERFISH_ALLOWED_BUCKETS",
    "TRIGGERFISH_DEFAULT_MODEL",
    "TRIGGERFISH_REQUEST_TIMEOUT_S",
    "GOOGLE_CLOUD_PROJECT",
}


#: gunicorn's settings in functions-framework (threads per instance, one worker process).
GUNICORN_ENV = {"THREADS", "WORKERS"}

#: Set for the ID token the functions send to Serve; read once the functions authenticate.
ID_TOKEN_ENV = {"TRIGGERFISH_SERVE_AUDIENCE"}


def _function():
    return child("functions").resource("google_cloudfunctions2_function", "this")


def _cloud_event_handlers(path):
    tree = ast.parse(path.read_text())
    handlers = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for decorator in node.decorator_list:
                if ast.unparse(decorator) == "functions_framework.cloud_event":
                    handlers.add(node.name)
    return handlers


def test_gen2_python311_functions_for_the_footprint_entry_points():
    fn = _function()
    build = block(fn, "build_config")
    assert build["runtime"] == "${var.runtime}"
    assert child("functions").variables["runtime"]["default"] == "python311"
    assert build["entry_point"] == "${each.value.entry_point}"
    assert (
        block(block(build, "source"), "storage_source")["object"]
        == "${google_storage_bucket_object.source.name}"
    )


def test_entry_points_are_cloud_event_handlers_in_functions_main():
    """Push delivery relies on the decorator: it makes functions-framework convert the
    raw Pub/Sub push body into a messagePublished CloudEvent."""
    import json

    from tests.terraform._hcl import FOOTPRINT

    footprint = json.loads(FOOTPRINT.read_text())
    entry_points = {
        s["entry_point"] for s in footprint["subscriptions"].values() if "entry_point" in s
    }
    assert entry_points == {"on_request", "on_upload", "on_bulk"}
    assert entry_points <= _cloud_event_handlers(REPO_ROOT / "functions" / "main.py")


def test_functions_retry_on_failure_through_their_push_subscription():
    """No Eventarc trigger (it cannot dead-letter); each function is the push endpoint of a
    subscription with a retry policy and a dead-letter policy."""
    fn = _function()
    for trigger in fn.get("event_trigger", []):
        assert trigger["retry_policy"] == "RETRY_POLICY_RETRY"
    assert "event_trigger" not in fn, "functions are fed by explicit push subscriptions"
    push = expr(root().module_calls["pubsub"]["push_subscriptions"])
    assert "forkey,subinlocal.function_subscriptions" in push
    assert "module.functions.uris[key]" in push
    functions = expr(root().module_calls["functions"]["functions"])
    assert functions.startswith("${{forkey,subinlocal.function_subscriptions:")
    sub = child("pubsub").resource("google_pubsub_subscription", "push")
    assert block(sub, "retry_policy") and block(sub, "dead_letter_policy")


def test_pubsub_push_may_invoke_the_functions_and_nothing_else_is_granted():
    invoker = child("functions").resource("google_cloud_run_service_iam_member", "invoker")
    assert invoker["for_each"] == "${google_cloudfunctions2_function.this}"
    assert invoker["service"] == "${each.value.name}"
    assert invoker["role"] == "roles/run.invoker"
    assert invoker["member"] == "serviceAccount:${var.invoker_service_account_email}"
    assert root().module_calls["functions"]["invoker_service_account_email"] == (
        '${google_service_account.this["push_invoker"].email}'
    )


def test_functions_run_as_a_dedicated_account_inside_the_vpc():
    service = block(_function(), "service_config")
    assert service["service_account_email"] == "${var.service_account_email}"
    assert service["ingress_settings"] == "ALLOW_INTERNAL_ONLY"
    assert service["vpc_connector"] == "${var.vpc_connector}"
    assert service["vpc_connector_egress_settings"] == "PRIVATE_RANGES_ONLY"
    assert service["timeout_seconds"] == "${each.value.timeout_seconds}"
    assert json.loads(FOOTPRINT.read_text())["functions"]["timeout_margin_seconds"] >= 10
    call = root().module_calls["functions"]
    assert call["service_account_email"] == '${google_service_account.this["functions"].email}'
    assert call["vpc_connector"] == "${module.network.vpc_connector_id}"


def test_function_environment_is_exactly_what_the_code_reads():
    env = root().module_calls["functions"]["environment_variables"]
    assert set(env) == FUNCTION_ENV | GUNICORN_ENV
    assert env["TRIGGERFISH_SERVE_URL"] == "${local.serve_endpoint}"
    assert env["TRIGGERFISH_SERVE_AUDIENCE"] == "${local.serve_audience}"
    assert env["TRIGGERFISH_RESULTS_BUCKET"] == '${module.storage.bucket_names["results"]}'
    assert env["TRIGGERFISH_ALLOWED_BUCKETS"] == '${join(",", local.allowed_buckets)}'
    assert env["TRIGGERFISH_DEFAULT_MODEL"] == "${var.default_model}"
    assert env["TRIGGERFISH_REQUEST_TIMEOUT_S"] == (
        "${tostring(local.function_settings.serve_wait_seconds)}"
    )
    assert env["GOOGLE_CLOUD_PROJECT"] == "${var.project_id}"
    assert (
        block(_function(), "service_config")["environment_variables"]
        == "${var.environment_variables}"
    )
    # functions-framework's gunicorn reads both (THREADS defaults to 4 x CPUs).
    import functions_framework

    gunicorn = Path(functions_framework.__file__).parent / "_http" / "gunicorn.py"
    for name in GUNICORN_ENV:
        assert f'os.environ.get("{name}"' in gunicorn.read_text(), name
    code = "\n".join(
        path.read_text()
        for package in ("functions", "shared")
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
    )
    unread = sorted(n for n in FUNCTION_ENV if n.removeprefix("TRIGGERFISH_") not in code)
    assert set(unread) <= ID_TOKEN_ENV, f"functions/ and shared/ never read {unread}"
    if unread:
        pytest.xfail(f"the functions do not send ID tokens yet ({unread} unread)")


def test_functions_call_serve_with_an_id_token_serve_verifies():
    """The audience the functions request their ID token for is the one the ingress checks, and
    the functions' own account is the invoker the ingress accepts."""
    top = root()
    assert top.locals["serve_audience"] == "${local.serve_endpoint}"
    assert expr(top.locals["allowed_invokers"]) == expr(
        '${concat([google_service_account.this["functions"].email], var.extra_serve_invokers)}'
    )
    serve_env = top.module_calls["ray"]["serve_environment"]
    assert serve_env["serve_audience"] == "${local.serve_audience}"
    assert serve_env["allowed_invokers"] == "${local.allowed_invokers}"
    assert serve_env["models"] == "${var.models}"


def test_serve_endpoint_is_the_internal_load_balancer_address():
    top = root()
    assert (
        top.locals["serve_endpoint"] == "http://${module.network.serve_address}:${local.serve_port}"
    )
    assert top.locals["serve_port"] == 8000
    assert (
        top.locals["allowed_buckets"]
        == "${concat([local.bucket_names.images], var.extra_source_buckets)}"
    )


def test_source_zip_is_named_by_content_hash():
    module = child("functions")
    source = module.resource("google_storage_bucket_object", "source")
    assert source["name"] == "functions-source-${local.source_sha256}.zip"
    assert expr(module.locals["source_sha256"]) == expr(
        '${local.source_exists ? filesha256(var.source_archive_path) : "missing"}'
    )
    assert (
        "python -m infra.packaging.package_functions"
        in source["lifecycle"][0]["precondition"][0]["error_message"]
    )
    assert (
        root()
        .locals["function_source_archive"]
        .endswith('"${path.module}/../build/functions-source.zip"}')
    )
