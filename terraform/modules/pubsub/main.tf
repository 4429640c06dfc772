/**
 * Topics, push subscriptions and the dead-letter path.
 *
 * Why explicit push subscriptions instead of Cloud Functions event triggers:
 * an Eventarc-managed Pub/Sub trigger (event_trigger with RETRY_POLICY_RETRY)
 * creates its own subscription that we cannot give a dead-letter policy, so a
 * poison message would be retried until the message retention runs out. An
 * explicit push subscription to the function's Cloud Run URL carries both an
 * exponential-backoff retry policy and a dead-letter policy with a bounded
 * number of attempts. A non-2xx answer from the function (it raised) is a
 * failed delivery, so "retry on function failure" holds. functions-framework
 * turns the raw push body into the same
 * google.cloud.pubsub.topic.v1.messagePublished CloudEvent that an Eventarc
 * trigger would deliver, so the handlers do not care which path fed them.
 */

resource "google_pubsub_topic" "this" {
  for_each = var.topics

  # checkov:skip=CKV_GCP_83: Messages carry gs:// object names, never image bytes or personal data; Google-managed encryption at rest is the deliberate choice and avoids a KMS key ring whose deletion would make every topic unusable.
  project                    = var.project_id
  name                       = each.value.name
  message_retention_duration = each.value.message_retention_duration
  labels                     = var.labels
}

resource "google_pubsub_topic" "dead_letter" {
  # checkov:skip=CKV_GCP_83: Same data as the source topics (object names and request ids); Google-managed encryption at rest is the deliberate choice.
  project                    = var.project_id
  name                       = var.dead_letter_topic.name
  message_retention_duration = var.dead_letter_topic.message_retention_duration
  labels                     = var.labels
}

resource "google_pubsub_subscription" "push" {
  for_each = var.push_subscriptions

  project = var.project_id
  name    = each.value.name
  topic   = google_pubsub_topic.this[each.value.topic].id
  labels  = var.labels

  # Pub/Sub waits this long for the push response. It must exceed the
  # function timeout, which in turn exceeds the time Serve takes to answer.
  ack_deadline_seconds       = each.value.ack_deadline_seconds
  message_retention_duration = each.value.message_retention_duration

  retry_policy {
    minimum_backoff = "${each.value.min_backoff_seconds}s"
    maximum_backoff = "${each.value.max_backoff_seconds}s"
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = each.value.max_delivery_attempts
  }

  push_config {
    push_endpoint = each.value.push_endpoint

    # The function accepts only authenticated calls; Pub/Sub signs each push
    # with an OIDC token for the dedicated invoker service account.
    oidc_token {
      service_account_email = var.push_invoker_service_account_email
      audience              = each.value.audience
    }
  }

  # Never delete an idle subscription (the default expires it after 31 days
  # without traffic, which would silently stop the pipeline).
  expiration_policy {
    ttl = ""
  }

  depends_on = [
    google_pubsub_topic_iam_member.dead_letter_publisher,
    google_service_account_iam_member.push_token_creator,
  ]
}

# The terminal sink: messages that exhausted their delivery attempts stay
# here for inspection and replay. It has a retry policy for nacked pulls but
# no dead-letter policy of its own: forwarding dead letters to another topic
# would only move the same problem one hop further (and pointing it at its
# own topic would loop).
# Redelivery backoff of the subscriptions that readers pull from or that BigQuery
# writes from (the push subscriptions take theirs from the footprint).
locals {
  reader_backoff = { minimum = "10s", maximum = "600s" }
}

resource "google_pubsub_subscription" "dead_letter" {
  project                    = var.project_id
  name                       = var.dead_letter_subscription.name
  topic                      = google_pubsub_topic.dead_letter.id
  labels                     = var.labels
  ack_deadline_seconds       = var.dead_letter_subscription.ack_deadline_seconds
  message_retention_duration = "${var.dead_letter_subscription.message_retention_seconds}s"
  retain_acked_messages      = false

  retry_policy {
    minimum_backoff = local.reader_backoff.minimum
    maximum_backoff = local.reader_backoff.maximum
  }

  expiration_policy {
    ttl = ""
  }
}

# Readers outside the pipeline (`triggerfish results`, a downstream service)
# pull at their own pace. No dead-letter policy: such a reader acknowledges
# everything it reads, and one that hands messages back unread (a `--max`
# reached) must not push them toward the dead-letter topic and its alert.
resource "google_pubsub_subscription" "pull" {
  for_each = var.pull_subscriptions

  project                    = var.project_id
  name                       = each.value.name
  topic                      = google_pubsub_topic.this[each.value.topic].id
  labels                     = var.labels
  ack_deadline_seconds       = each.value.ack_deadline_seconds
  message_retention_duration = "${each.value.message_retention_seconds}s"
  retain_acked_messages      = false

  retry_policy {
    minimum_backoff = local.reader_backoff.minimum
    maximum_backoff = local.reader_backoff.maximum
  }

  # A reader started late catches up: an idle subscription must not expire.
  expiration_policy {
    ttl = ""
  }
}

# Every message becomes a row: write_metadata adds subscription_name,
# message_id, publish_time and attributes (as JSON) next to data, the columns of
# terraform/schemas/result_events.json. A row BigQuery refuses is retried with
# backoff and then dead-lettered like a failed push.
resource "google_pubsub_subscription" "bigquery" {
  for_each = var.bigquery_subscriptions

  project = var.project_id
  name    = each.value.name
  topic   = google_pubsub_topic.this[each.value.topic].id
  labels  = var.labels

  bigquery_config {
    table          = each.value.table
    write_metadata = true
  }

  retry_policy {
    minimum_backoff = local.reader_backoff.minimum
    maximum_backoff = local.reader_backoff.maximum
  }

  dead_letter_policy {
    dead_letter_topic     = google_pubsub_topic.dead_letter.id
    max_delivery_attempts = each.value.max_delivery_attempts
  }

  expiration_policy {
    ttl = ""
  }

  depends_on = [google_pubsub_topic_iam_member.dead_letter_publisher]
}

# Dead-lettering is performed by the Pub/Sub service agent: it must be able
# to publish to the dead-letter topic and to acknowledge (subscribe to) the
# source subscriptions it forwards from.
resource "google_pubsub_topic_iam_member" "dead_letter_publisher" {
  project = var.project_id
  topic   = google_pubsub_topic.dead_letter.name
  role    = "roles/pubsub.publisher"
  member  = "serviceAccount:${var.pubsub_service_agent_email}"
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber" {
  for_each = google_pubsub_subscription.push

  project      = var.project_id
  subscription = each.value.name
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${var.pubsub_service_agent_email}"
}

resource "google_pubsub_subscription_iam_member" "dead_letter_subscriber_bigquery" {
  for_each = google_pubsub_subscription.bigquery

  project      = var.project_id
  subscription = each.value.name
  role         = "roles/pubsub.subscriber"
  member       = "serviceAccount:${var.pubsub_service_agent_email}"
}

# The service agent mints the OIDC tokens attached to push requests, which
# requires Token Creator on the invoker account (granted on that account
# only, not project-wide).
resource "google_service_account_iam_member" "push_token_creator" {
  service_account_id = "projects/${var.project_id}/serviceAccounts/${var.push_invoker_service_account_email}"
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = "serviceAccount:${var.pubsub_service_agent_email}"
}
