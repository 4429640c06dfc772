output "alert_policies" {
  description = "Alert policy ids keyed by what they watch."
  value = {
    dead_letters    = google_monitoring_alert_policy.dead_letters.id
    function_errors = google_monitoring_alert_policy.function_errors.id
    serve_errors    = google_monitoring_alert_policy.serve_errors.id
    serve_latency   = google_monitoring_alert_policy.serve_latency.id
  }
}

output "pod_monitoring" {
  description = "Namespace/name of the PodMonitoring that scrapes the Ray pods."
  value       = "${var.namespace}/ray"
}
