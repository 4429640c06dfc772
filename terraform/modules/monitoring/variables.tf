variable "project_id" {
  type        = string
  description = "Project that holds the alert policies and the monitored resources."
}

variable "manifests_dir" {
  type        = string
  description = "Folder holding the Kubernetes manifest templates (infra/k8s; podmonitoring.yaml)."
}

variable "namespace" {
  type        = string
  description = "Namespace of the Ray pods to scrape."
}

variable "scrape_interval" {
  type        = string
  description = "How often Managed Service for Prometheus scrapes the Ray pods."
  default     = "30s"
}

variable "dead_letter_subscription" {
  type        = string
  description = "Pull subscription on the dead-letter topic whose backlog is watched."
}

variable "function_service_names" {
  type        = list(string)
  description = "Cloud Run service names of the functions (a gen2 function's service has the function's name)."
}

variable "notification_channels" {
  type        = list(string)
  description = "Notification channel ids (projects/PROJECT/notificationChannels/ID) the alerts go to; empty means alerts show in the console only."
  default     = []
}

variable "thresholds" {
  type = object({
    dead_letter_messages        = optional(number, 0)
    dead_letter_age_seconds     = optional(number, 3600)
    function_errors_per_second  = optional(number, 0.1)
    function_errors_for_seconds = optional(number, 1800)
    serve_error_ratio           = optional(number, 0.05)
    serve_p95_seconds           = optional(number, 2.5)
  })
  description = "Alert thresholds: dead letters waiting (count, age of the oldest), function 5xx rate and how long it must last, Serve share of non-ok requests, Serve p95 latency in seconds."
  default     = {}
}

variable "labels" {
  type        = map(string)
  description = "User labels on the alert policies."
  default     = {}
}
