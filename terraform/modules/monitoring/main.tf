/**
 * Observability: Managed Service for Prometheus scrapes the Ray pods, and
 * Cloud Monitoring alerts on what needs a person.
 *
 *   dead letters   the dead-letter subscription holds messages, or its oldest
 *                  one has waited too long: inputs that exhausted their
 *                  delivery attempts and have no result yet
 *   function errors the functions answer 5xx (Serve unreachable or failing,
 *                  so Pub/Sub redelivers) for longer than a cold start
 *   Serve errors   share of non-"ok" requests in ray_triggerfish_requests_total
 *   Serve latency  p95 of ray_triggerfish_request_duration_seconds
 *
 * The Serve conditions are PromQL over the series Managed Service for
 * Prometheus collects (labels model, version, entry_path, status).
 */

locals {
  serve_selector = "namespace=\"${var.namespace}\""

  serve_error_ratio = join(" ", [
    "sum(rate(ray_triggerfish_requests_total{${local.serve_selector},status!=\"ok\"}[5m]))",
    "/ sum(rate(ray_triggerfish_requests_total{${local.serve_selector}}[5m]))",
    "> ${var.thresholds.serve_error_ratio}",
  ])

  serve_p95 = join(" ", [
    "histogram_quantile(0.95, sum by (le) (rate(ray_triggerfish_request_duration_seconds_bucket{${local.serve_selector}}[5m])))",
    "> ${var.thresholds.serve_p95_seconds}",
  ])

  function_services = join(" OR ", [for name in var.function_service_names : "resource.labels.service_name = \"${name}\""])

  documentation = "See terraform/README.md, section Monitoring, for what each alert means and what to do."
}

resource "kubectl_manifest" "pod_monitoring" {
  yaml_body = templatefile("${var.manifests_dir}/podmonitoring.yaml", {
    namespace       = var.namespace
    scrape_interval = var.scrape_interval
  })
}

resource "google_monitoring_alert_policy" "dead_letters" {
  project      = var.project_id
  display_name = "triggerfish: dead letters waiting"
  combiner     = "OR"
  user_labels  = var.labels

  conditions {
    display_name = "undelivered dead letters above ${var.thresholds.dead_letter_messages}"

    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${var.dead_letter_subscription}\" AND metric.type = \"pubsub.googleapis.com/subscription/num_undelivered_messages\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.thresholds.dead_letter_messages
      duration        = "300s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  conditions {
    display_name = "oldest dead letter older than ${var.thresholds.dead_letter_age_seconds}s"

    condition_threshold {
      filter          = "resource.type = \"pubsub_subscription\" AND resource.labels.subscription_id = \"${var.dead_letter_subscription}\" AND metric.type = \"pubsub.googleapis.com/subscription/oldest_unacked_message_age\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.thresholds.dead_letter_age_seconds
      duration        = "300s"

      aggregations {
        alignment_period   = "60s"
        per_series_aligner = "ALIGN_MAX"
      }
    }
  }

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    content   = "Messages exhausted their delivery attempts on ${var.dead_letter_subscription}. Inspect them (gcloud pubsub subscriptions pull ${var.dead_letter_subscription} --limit 10, without --auto-ack), fix the cause, then republish them to their topic. ${local.documentation}"
    mime_type = "text/markdown"
  }

  notification_channels = var.notification_channels
}

resource "google_monitoring_alert_policy" "function_errors" {
  project      = var.project_id
  display_name = "triggerfish: function errors"
  combiner     = "OR"
  user_labels  = var.labels

  conditions {
    display_name = "5xx answers of the functions above ${var.thresholds.function_errors_per_second}/s"

    condition_threshold {
      filter          = "resource.type = \"cloud_run_revision\" AND (${local.function_services}) AND metric.type = \"run.googleapis.com/request_count\" AND metric.labels.response_code_class = \"5xx\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.thresholds.function_errors_per_second
      duration        = "${var.thresholds.function_errors_for_seconds}s"

      aggregations {
        alignment_period     = "60s"
        per_series_aligner   = "ALIGN_RATE"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.labels.service_name"]
      }
    }
  }

  documentation {
    content   = "A function fails when Serve is unreachable, overloaded or failing; Pub/Sub redelivers with backoff. Errors lasting longer than a scale-from-zero cold start mean Serve is down. ${local.documentation}"
    mime_type = "text/markdown"
  }

  notification_channels = var.notification_channels
}

resource "google_monitoring_alert_policy" "serve_errors" {
  project      = var.project_id
  display_name = "triggerfish: Serve error rate"
  combiner     = "OR"
  user_labels  = var.labels

  conditions {
    display_name = "share of requests with status other than ok above ${var.thresholds.serve_error_ratio}"

    condition_prometheus_query_language {
      query               = local.serve_error_ratio
      duration            = "600s"
      evaluation_interval = "60s"
    }
  }

  documentation {
    content   = "ray_triggerfish_requests_total counts requests by model, version, entry_path and status. ${local.documentation}"
    mime_type = "text/markdown"
  }

  notification_channels = var.notification_channels
}

resource "google_monitoring_alert_policy" "serve_latency" {
  project      = var.project_id
  display_name = "triggerfish: Serve p95 latency"
  combiner     = "OR"
  user_labels  = var.labels

  conditions {
    display_name = "p95 request duration above ${var.thresholds.serve_p95_seconds}s"

    condition_prometheus_query_language {
      query               = local.serve_p95
      duration            = "600s"
      evaluation_interval = "60s"
    }
  }

  documentation {
    content   = "ray_triggerfish_request_duration_seconds is the time the Serve ingress takes per request. ${local.documentation}"
    mime_type = "text/markdown"
  }

  notification_channels = var.notification_channels
}
