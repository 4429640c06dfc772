"""Least privilege: dedicated accounts, resource-level grants, no primitive roles."""

from __future__ import annotations

import re

from tests.terraform._hcl import all_modules, root

PRIMITIVE = {"roles/owner", "roles/editor", "roles/viewer"}


def _grants():
    for module in all_modules():
        for rtype, name, body in module.iter_resources():
            if re.search(r"_iam_(member|binding|policy)$", rtype):
                yield module.path.name, rtype, name, body


def test_no_primitive_role_anywhere():
    grants = list(_grants())
    assert len(grants) > 10
    for module_name, rtype, name, body in grants:
        assert body.get("role") not in PRIMITIVE, f"{module_name}: {rtype}.{name}"
    for module in all_modules():
        for role in PRIMITIVE:
            assert f'"{role}"' not in module.text, f"{module.path.name} mentions {role}"
    for role in root().locals["gke_node_roles"]:
        assert role not in PRIMITIVE


def test_no_iam_policy_or_binding_resources_that_would_take_over_a_role():
    for module_name, rtype, name, _ in _grants():
        assert rtype.endswith("_iam_member"), (
            f"{module_name}: {rtype}.{name} is authoritative; use *_iam_member"
        )


def test_each_workload_has_its_own_service_account():
    accounts = root().locals["service_accounts"]
    assert set(accounts) == {"functions", "functions_build", "push_invoker", "serve", "gke_nodes"}


def _grants_to(account):
    member = f'${{google_service_account.this["{account}"].member}}'
    return {
        (rtype, name): body
        for module_name, rtype, name, body in _grants()
        if module_name == "terraform" and body.get("member") == member
    }


def test_functions_may_only_write_results():
    grants = _grants_to("functions")
    assert set(grants) == {("google_storage_bucket_iam_member", "functions_results")}
    (grant,) = grants.values()
    assert grant["bucket"] == '${module.storage.bucket_names["results"]}'
    assert grant["role"] == "${google_project_iam_custom_role.result_writer.id}"
    role = root().resource("google_project_iam_custom_role", "result_writer")
    assert sorted(role["permissions"]) == [
        "storage.objects.create",
        "storage.objects.delete",
        "storage.objects.get",
    ]


def test_serve_reads_images_and_models_writes_results_and_uses_the_engine_cache():
    grants = {name: body for (_, name), body in _grants_to("serve").items()}
    assert grants["serve_sources"]["role"] == "roles/storage.objectViewer"
    assert grants["serve_models"]["role"] == "roles/storage.objectViewer"
    assert grants["serve_results"]["role"] == "${google_project_iam_custom_role.result_writer.id}"
    assert grants["serve_engine_cache"]["role"] == "roles/storage.objectUser"
    assert set(grants) == {"serve_sources", "serve_models", "serve_results", "serve_engine_cache"}
    assert all(body.get("bucket") for body in grants.values()), "Serve grants are bucket-level only"


def test_push_invoker_has_no_grant_beyond_run_invoker():
    assert _grants_to("push_invoker") == {}


def test_project_level_grants_are_limited_to_logging_and_monitoring():
    allowed = {
        "roles/autoscaling.metricsWriter",
        "roles/logging.logWriter",
        "roles/monitoring.metricWriter",
        "roles/stackdriver.resourceMetadata.writer",
    }
    top = root()
    assert set(top.locals["gke_node_roles"]) <= allowed
    for name, body in top.resources["google_project_iam_member"].items():
        role = body["role"]
        if "condition" in body:
            # A storage role on the project must be narrowed to one bucket by a condition.
            expression = body["condition"][0]["expression"]
            assert expression.startswith(
                'resource.name.startsWith(\\"projects/_/buckets/gcf-v2-sources-'
            )
            assert role == "roles/storage.objectViewer", name
            continue
        assert role in allowed or role == "${each.value}", name


def test_service_account_ids_fit_for_the_longest_allowed_prefix():
    top = root()
    condition = top.variables["name_prefix"]["validation"][0]["condition"]
    longest_prefix = int(re.search(r"\{1,(\d+)\}", condition).group(1)) + 1
    assert top.variables["name_prefix"]["default"] == "triggerfish"
    for key in top.locals["service_accounts"]:
        account_id = "x" * longest_prefix + "-" + key.replace("_", "-")
        assert 6 <= len(account_id) <= 30, account_id
