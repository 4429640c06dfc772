"""Result events: the results bucket notifies the results topic; a pull subscription and an
optional BigQuery table (schema in the repository) receive them."""

from __future__ import annotations

import json
import re

from shared import result_store
from tests.terraform._hcl import FOOTPRINT, TF_ROOT, block, child, expr, root

SCHEMA = TF_ROOT / "schemas" / "result_events.json"
GUIDE = TF_ROOT / "README.md"
# The columns a BigQuery subscription with write_metadata (and no topic or table schema) fills.
WRITE_METADATA_COLUMNS = {
    "subscription_name": "STRING",
    "message_id": "STRING",
    "publish_time": "TIMESTAMP",
    "data": "STRING",
    "attributes": "STRING",
}


def test_the_results_bucket_notifies_the_results_topic_on_finalize():
    notification = root().module_calls["storage"]["result_notification"]
    assert notification == {
        "bucket": "results",
        "topic": '${module.pubsub.topic_ids["results"]}',
        "event_types": ["OBJECT_FINALIZE"],
    }
    storage = child("storage")
    resource = storage.resource("google_storage_notification", "results")
    assert resource["payload_format"] == "JSON_API_V1"  # the object resource, metadata included
    assert resource["topic"] == "${var.result_notification.topic}"
    assert resource["event_types"] == "${var.result_notification.event_types}"
    assert (
        resource["bucket"] == "${google_storage_bucket.this[var.result_notification.bucket].name}"
    )
    assert resource["depends_on"] == ["${google_pubsub_topic_iam_member.gcs_results_publisher}"]
    grant = storage.resource("google_pubsub_topic_iam_member", "gcs_results_publisher")
    assert grant["topic"] == "${var.result_notification.topic}"
    assert grant["role"] == "roles/pubsub.publisher"
    assert grant["member"] == "serviceAccount:${var.gcs_service_agent_email}"


def test_the_results_topic_is_a_footprint_topic_with_a_pull_subscription_from_the_footprint():
    footprint = json.loads(FOOTPRINT.read_text())
    assert "results" in footprint["topics"]  # module "pubsub" creates every topic but dead_letter
    readers = {
        key
        for key, sub in footprint["subscriptions"].items()
        if "entry_point" not in sub and key != "dead_letter"
    }
    assert readers == {"results"}
    local = expr(root().locals["pull_subscriptions"])
    assert 'lookup(sub,"entry_point",null)==null&&key!="dead_letter"' in local
    call = expr(root().module_calls["pubsub"]["pull_subscriptions"])
    for field in ("name", "topic", "ack_deadline_seconds", "message_retention_seconds"):
        assert f"{field}=sub.{field}" in call, field
    assert footprint["subscriptions"]["results"]["message_retention_seconds"] == 7 * 24 * 3600

    pull = child("pubsub").resource("google_pubsub_subscription", "pull")
    assert pull["topic"] == "${google_pubsub_topic.this[each.value.topic].id}"
    assert pull["message_retention_duration"] == "${each.value.message_retention_seconds}s"
    assert block(pull, "expiration_policy")["ttl"] == ""  # a late reader catches up
    assert "push_config" not in pull and "bigquery_config" not in pull


def test_bigquery_is_optional_and_off_by_default():
    top = root()
    variable = top.variables["results_bigquery"]
    assert "enabled=optional(bool,false)" in expr(variable["type"])
    assert variable["default"] == {}
    call = top.module_calls["results_bigquery"]
    assert call["source"] == "./modules/results-bigquery"
    assert call["count"] == "${var.results_bigquery.enabled ? 1 : 0}"
    assert call["schema"] == '${file("${path.module}/schemas/result_events.json")}'
    assert call["writer_service_account_email"] == "${local.pubsub_service_agent}"
    subscriptions = expr(top.module_calls["pubsub"]["bigquery_subscriptions"])
    assert subscriptions.startswith("${var.results_bigquery.enabled?{")
    assert (
        "table=module.results_bigquery[0].table_id" in subscriptions
        and 'topic="results"' in subscriptions
    )
    assert (
        expr(top.locals["bigquery_apis"])
        == '${var.results_bigquery.enabled?["bigquery.googleapis.com"]:[]}'
    )
    assert "local.bigquery_apis" in top.resource("google_project_service", "this")["for_each"]


def test_the_bigquery_subscription_writes_metadata_and_dead_letters():
    pubsub = child("pubsub")
    sub = pubsub.resource("google_pubsub_subscription", "bigquery")
    config = block(sub, "bigquery_config")
    assert config == {"table": "${each.value.table}", "write_metadata": True}
    assert (
        block(sub, "dead_letter_policy")["dead_letter_topic"]
        == "${google_pubsub_topic.dead_letter.id}"
    )
    grant = pubsub.resource(
        "google_pubsub_subscription_iam_member", "dead_letter_subscriber_bigquery"
    )
    assert grant["for_each"] == "${google_pubsub_subscription.bigquery}"
    assert grant["member"] == "serviceAccount:${var.pubsub_service_agent_email}"


def test_the_pubsub_service_agent_may_write_the_table_before_the_subscription_exists():
    bigquery = child("results-bigquery")
    grant = bigquery.resource("google_bigquery_dataset_iam_member", "pubsub_writer")
    assert grant["role"] == "roles/bigquery.dataEditor"
    assert grant["dataset_id"] == "${google_bigquery_dataset.this.dataset_id}"
    assert grant["member"] == "serviceAccount:${var.writer_service_account_email}"
    table_id = bigquery.outputs["table_id"]
    assert table_id["depends_on"] == ["${google_bigquery_dataset_iam_member.pubsub_writer}"]
    table = bigquery.resource("google_bigquery_table", "events")
    assert table["schema"] == "${var.schema}"
    assert block(table, "time_partitioning")["field"] == "publish_time"


def test_the_schema_has_the_columns_a_metadata_writing_subscription_fills():
    columns = json.loads(SCHEMA.read_text())
    assert {c["name"]: c["type"] for c in columns} == WRITE_METADATA_COLUMNS
    assert all(c["mode"] == "NULLABLE" and c["description"] for c in columns)


def test_the_guides_query_reads_columns_of_the_schema_and_metadata_the_store_writes():
    text = GUIDE.read_text()
    query = text[text.index("bq query") :].split("```", 1)[0]
    names = {c["name"] for c in json.loads(SCHEMA.read_text())}
    assert {"data", "publish_time"} <= names
    for column in re.findall(r"\b(data|publish_time|attributes|message_id)\b", query):
        assert column in names
    keys = set(re.findall(r'metadata\.\\"([a-z-]+)\\"', query))
    assert keys == {result_store.STATUS_METADATA_KEY, result_store.TOP_LABEL_METADATA_KEY}, keys
    assert "FROM `triggerfish.result_events`" in query
