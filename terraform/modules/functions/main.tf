/**
 * Cloud Functions (gen2) for the two entry points in functions/main.py.
 *
 * Triggering: these functions have no event_trigger. Each one is fed by an
 * explicit Pub/Sub push subscription (modules/pubsub) that targets the
 * function's Cloud Run URL with an OIDC token, because only such a
 * subscription can carry both a retry policy and a dead-letter policy. A
 * function that raises answers 500, which Pub/Sub treats as a failed
 * delivery: retried with exponential backoff, dead-lettered after the
 * configured number of attempts. The handlers are registered with
 * @functions_framework.cloud_event, so the framework converts the raw push
 * body into a google.cloud.pubsub.topic.v1.messagePublished CloudEvent.
 *
 * Source: the zip built by infra/packaging/package_functions.py (deterministic, so the
 * same tree gives the same bytes). It is uploaded under a name that contains
 * its sha256: a change of code or requirements changes the object name,
 * which changes the function's build source and redeploys it.
 */

locals {
  source_exists = fileexists(var.source_archive_path)
  source_sha256 = local.source_exists ? filesha256(var.source_archive_path) : "missing"
}

resource "google_storage_bucket_object" "source" {
  bucket       = var.source_bucket
  name         = "functions-source-${local.source_sha256}.zip"
  source       = var.source_archive_path
  content_type = "application/zip"

  lifecycle {
    precondition {
      condition     = local.source_exists
      error_message = "Function source zip not found at ${var.source_archive_path}. Build it first: python -m infra.packaging.package_functions --out build/functions-source.zip"
    }
  }
}

resource "google_cloudfunctions2_function" "this" {
  for_each = var.functions

  project     = var.project_id
  location    = var.region
  name        = each.value.name
  description = each.value.description
  labels      = var.labels

  build_config {
    runtime           = var.runtime
    entry_point       = each.value.entry_point
    service_account   = var.build_service_account_id
    docker_repository = var.build_docker_repository

    source {
      storage_source {
        bucket = var.source_bucket
        object = google_storage_bucket_object.source.name
      }
    }
  }

  service_config {
    service_account_email            = var.service_account_email
    timeout_seconds                  = each.value.timeout_seconds
    available_memory                 = each.value.available_memory
    available_cpu                    = each.value.available_cpu
    min_instance_count               = each.value.min_instance_count
    max_instance_count               = each.value.max_instance_count
    max_instance_request_concurrency = each.value.max_instance_request_concurrency
    environment_variables            = var.environment_variables
    all_traffic_on_latest_revision   = true

    # Only Pub/Sub push (an internal source in the same project) and callers
    # inside the VPC may reach the function.
    ingress_settings = "ALLOW_INTERNAL_ONLY"

    # The Serve endpoint is an internal load balancer address; private
    # ranges go through the connector, Google APIs stay on the default path.
    vpc_connector                 = var.vpc_connector
    vpc_connector_egress_settings = "PRIVATE_RANGES_ONLY"
  }

  lifecycle {
    precondition {
      condition     = var.request_timeout_s < each.value.timeout_seconds
      error_message = "TRIGGERFISH_REQUEST_TIMEOUT_S (${var.request_timeout_s}) must be shorter than the timeout of function ${each.value.name} (${each.value.timeout_seconds}s), or a slow Serve answer would be cut off without the error being handled."
    }
    precondition {
      condition     = var.serve_request_timeout_s < var.request_timeout_s
      error_message = "Serve's request timeout (${var.serve_request_timeout_s}s) must be shorter than the functions' wait for Serve (${var.request_timeout_s}s), so Serve answers before the function gives up."
    }
  }
}

# Pub/Sub push authenticates as the invoker account; gen2 functions are
# Cloud Run services of the same name, so invocation needs run.invoker there.
resource "google_cloud_run_service_iam_member" "invoker" {
  for_each = google_cloudfunctions2_function.this

  project  = var.project_id
  location = var.region
  service  = each.value.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${var.invoker_service_account_email}"
}
