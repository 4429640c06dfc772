/**
 * The optional BigQuery table of result events: one row per results-bucket
 * notification, written by a BigQuery subscription on the results topic
 * (created by the pubsub module with this module's table_id).
 *
 * The subscription writes its metadata columns (write_metadata): the
 * notification's JSON object resource lands in `data` and its attributes in
 * `attributes`, so the table needs no schema of its own beyond the five columns
 * in terraform/schemas/result_events.json, and queries read the result's
 * fields with JSON_VALUE (terraform/README.md, "Result events in BigQuery").
 */

resource "google_bigquery_dataset" "this" {
  # checkov:skip=CKV_GCP_81: Rows hold object names, model names, labels and scores, never image bytes or personal data; Google-managed encryption at rest is the deliberate choice, as for the topics they come from.
  project     = var.project_id
  dataset_id  = var.dataset_id
  location    = var.location
  description = "triggerfish result events (one row per stored result)."
  labels      = var.labels
}

resource "google_bigquery_table" "events" {
  # checkov:skip=CKV_GCP_80: Same data as the results topic's notifications; Google-managed encryption at rest is the deliberate choice.
  # checkov:skip=CKV_GCP_121: Protection is var.deletion_protection, from the root's results_bigquery.deletion_protection (default true); checkov does not follow the value through the module call.
  project             = var.project_id
  dataset_id          = google_bigquery_dataset.this.dataset_id
  table_id            = var.table_id
  description         = "One row per result event: the results bucket's OBJECT_FINALIZE notification, written by a Pub/Sub BigQuery subscription."
  schema              = var.schema
  deletion_protection = var.deletion_protection
  labels              = var.labels

  # Queries look at recent events: a day's partition is what a time filter reads.
  time_partitioning {
    type          = "DAY"
    field         = "publish_time"
    expiration_ms = var.partition_expiration_days > 0 ? var.partition_expiration_days * 86400000 : null
  }
}

# The subscription writes as the Pub/Sub service agent, which needs to read the
# table's metadata and insert rows: dataEditor on this dataset only.
resource "google_bigquery_dataset_iam_member" "pubsub_writer" {
  project    = var.project_id
  dataset_id = google_bigquery_dataset.this.dataset_id
  role       = "roles/bigquery.dataEditor"
  member     = "serviceAccount:${var.writer_service_account_email}"
}
