/**
 * Buckets that can never become public, the upload notification and the
 * result notification.
 */

resource "google_storage_bucket" "this" {
  for_each = var.buckets

  # checkov:skip=CKV_GCP_62: Object access is audited with Cloud Audit Logs Data Access logs for storage.googleapis.com, which the organisation's audit policy enables; legacy usage-log buckets would add a second, weaker trail and another bucket to secure.
  # checkov:skip=CKV_GCP_78: Versioning is set per bucket: on for models and results (data worth protecting), off for images (transient inputs deleted by lifecycle), engine_cache (rebuildable from ONNX) and function_source (objects are named by content hash and never overwritten).
  project       = var.project_id
  name          = each.value.name
  location      = var.location
  storage_class = each.value.storage_class
  force_destroy = each.value.force_destroy
  labels        = var.labels

  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"

  versioning {
    enabled = each.value.versioning
  }

  dynamic "lifecycle_rule" {
    for_each = each.value.lifecycle_rules

    content {
      action {
        type          = lifecycle_rule.value.action.type
        storage_class = lifecycle_rule.value.action.storage_class
      }

      condition {
        age                        = lifecycle_rule.value.condition.age
        num_newer_versions         = lifecycle_rule.value.condition.num_newer_versions
        with_state                 = lifecycle_rule.value.condition.with_state
        days_since_noncurrent_time = lifecycle_rule.value.condition.days_since_noncurrent_time
        matches_prefix             = lifecycle_rule.value.condition.matches_prefix
      }
    }
  }
}

# Cloud Storage publishes notifications as its service agent; without this
# grant the notification cannot be created.
resource "google_pubsub_topic_iam_member" "gcs_publisher" {
  project = var.project_id
  topic   = var.upload_notification.topic
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${var.gcs_service_agent_email}"
}

# JSON_API_V1 puts the object resource (bucket, name, generation, ...) in the
# message data; functions/main.py on_upload parses exactly that.
resource "google_storage_notification" "upload" {
  bucket         = google_storage_bucket.this[var.upload_notification.bucket].name
  topic          = var.upload_notification.topic
  payload_format = "JSON_API_V1"
  event_types    = var.upload_notification.event_types

  depends_on = [google_pubsub_topic_iam_member.gcs_publisher]
}

resource "google_pubsub_topic_iam_member" "gcs_results_publisher" {
  project = var.project_id
  topic   = var.result_notification.topic
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${var.gcs_service_agent_email}"
}

# Every stored result becomes one event: a result object is created only by a
# write that wins (shared/result_store.py conditions each on a generation), and
# Cloud Storage notifies once the object is final, so never before it is
# readable. The payload's object resource carries the result's custom metadata
# (status, model, source, summary): nothing on the hot path publishes.
resource "google_storage_notification" "results" {
  bucket         = google_storage_bucket.this[var.result_notification.bucket].name
  topic          = var.result_notification.topic
  payload_format = "JSON_API_V1"
  event_types    = var.result_notification.event_types

  depends_on = [google_pubsub_topic_iam_member.gcs_results_publisher]
}
