"""Buckets can never become public; uploads notify the uploads topic."""

from __future__ import annotations

import re

from tests.terraform._hcl import all_modules, block, child, root

PUBLIC_MEMBERS = ("allUsers", "allAuthenticatedUsers")


def test_every_bucket_has_uniform_access_and_enforced_public_access_prevention():
    buckets = [
        (module.path.name, name, body)
        for module in all_modules()
        for name, body in module.resources.get("google_storage_bucket", {}).items()
    ]
    assert buckets, "no google_storage_bucket found"
    for module_name, name, body in buckets:
        assert body["uniform_bucket_level_access"] is True, f"{module_name}: {name}"
        assert body["public_access_prevention"] == "enforced", f"{module_name}: {name}"


def test_no_public_principal_appears_anywhere():
    for module in all_modules():
        for member in PUBLIC_MEMBERS:
            assert member not in module.text, f"{module.path.name} mentions {member}"
        for rtype, name, body in module.iter_resources():
            if re.search(r"_iam_(member|binding|policy)$", rtype):
                members = body.get("members", [body.get("member", "")])
                assert not any(m in str(members) for m in PUBLIC_MEMBERS), f"{rtype}.{name}"


def test_versioning_protects_models_and_results_only():
    buckets = root().module_calls["storage"]["buckets"]
    assert {k: v["versioning"] for k, v in buckets.items()} == {
        "images": False,
        "results": True,
        "models": True,
        "engine_cache": False,
        "function_source": False,
    }
    bucket = child("storage").resource("google_storage_bucket", "this")
    assert block(bucket, "versioning")["enabled"] == "${each.value.versioning}"


def test_lifecycle_rules_expire_images_and_engine_cache():
    buckets = root().module_calls["storage"]["buckets"]
    for key, variable in (
        ("images", "images_retention_days"),
        ("engine_cache", "engine_cache_retention_days"),
    ):
        (rule,) = buckets[key]["lifecycle_rules"]
        assert rule["action"]["type"] == "Delete"
        assert rule["condition"]["age"] == f"${{var.{variable}}}"
    for key in ("results", "models"):
        (rule,) = buckets[key]["lifecycle_rules"]
        assert rule["condition"]["with_state"] == "ARCHIVED", (
            "only old versions of results/models expire"
        )
    assert "dynamic" in child("storage").resource("google_storage_bucket", "this")


def test_images_bucket_notifies_the_uploads_topic_on_finalize():
    notification = root().module_calls["storage"]["upload_notification"]
    assert notification == {
        "bucket": "images",
        "topic": '${module.pubsub.topic_ids["uploads"]}',
        "event_types": ["OBJECT_FINALIZE"],
    }
    storage = child("storage")
    resource = storage.resource("google_storage_notification", "upload")
    assert resource["payload_format"] == "JSON_API_V1"
    assert resource["topic"] == "${var.upload_notification.topic}"
    assert resource["event_types"] == "${var.upload_notification.event_types}"
    assert (
        resource["bucket"] == "${google_storage_bucket.this[var.upload_notification.bucket].name}"
    )
    assert resource["depends_on"] == ["${google_pubsub_topic_iam_member.gcs_publisher}"]


def test_gcs_service_agent_may_publish_to_the_uploads_topic():
    grant = child("storage").resource("google_pubsub_topic_iam_member", "gcs_publisher")
    assert grant["topic"] == "${var.upload_notification.topic}"
    assert grant["role"] == "roles/pubsub.publisher"
    assert grant["member"] == "serviceAccount:${var.gcs_service_agent_email}"
    top = root()
    assert top.module_calls["storage"]["gcs_service_agent_email"] == (
        "${data.google_storage_project_service_account.gcs.email_address}"
    )
