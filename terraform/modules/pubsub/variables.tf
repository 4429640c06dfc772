variable "project_id" {
  type        = string
  description = "Project that owns the topics and subscriptions."
}

variable "topics" {
  type = map(object({
    name                       = string
    message_retention_duration = optional(string, "86400s")
  }))
  description = "Source topics (requests, uploads), keyed by the footprint key. Each gets one push subscription."
}

variable "dead_letter_topic" {
  type = object({
    name                       = string
    message_retention_duration = optional(string, "604800s")
  })
  description = "Topic that receives messages whose delivery failed max_delivery_attempts times."
}

variable "push_subscriptions" {
  type = map(object({
    name                       = string
    topic                      = string
    push_endpoint              = string
    audience                   = string
    ack_deadline_seconds       = number
    min_backoff_seconds        = number
    max_backoff_seconds        = number
    max_delivery_attempts      = number
    message_retention_duration = optional(string, "604800s")
  }))
  description = "Push subscriptions keyed by footprint key. topic is a key of var.topics; push_endpoint is the HTTPS URL of the function's Cloud Run service; requests carry an OIDC token for var.push_invoker_service_account_email with the given audience."

  validation {
    condition = alltrue([
      for s in values(var.push_subscriptions) : s.max_delivery_attempts >= 5 && s.max_delivery_attempts <= 100
    ])
    error_message = "max_delivery_attempts must be between 5 and 100 (the bounds Pub/Sub accepts for dead-lettering)."
  }

  validation {
    condition = alltrue([
      for s in values(var.push_subscriptions) : s.ack_deadline_seconds >= 10 && s.ack_deadline_seconds <= 600
    ])
    error_message = "ack_deadline_seconds must be between 10 and 600."
  }

  validation {
    condition = alltrue([
      for s in values(var.push_subscriptions) :
      s.min_backoff_seconds >= 0 && s.max_backoff_seconds <= 600 && s.min_backoff_seconds <= s.max_backoff_seconds
    ])
    error_message = "Backoff must satisfy 0 <= min_backoff_seconds <= max_backoff_seconds <= 600."
  }

  validation {
    condition     = alltrue([for s in values(var.push_subscriptions) : startswith(s.push_endpoint, "https://")])
    error_message = "push_endpoint must be an https:// URL."
  }
}

variable "dead_letter_subscription" {
  type = object({
    name                      = string
    ack_deadline_seconds      = number
    message_retention_seconds = number
  })
  description = "Pull subscription on the dead-letter topic where operators inspect and replay failed messages."
}

variable "pull_subscriptions" {
  type = map(object({
    name                      = string
    topic                     = string
    ack_deadline_seconds      = number
    message_retention_seconds = number
  }))
  description = "Pull subscriptions for readers outside the pipeline (the results events that `triggerfish results` reads), keyed by footprint key; topic is a key of var.topics."
  default     = {}
}

variable "bigquery_subscriptions" {
  type = map(object({
    name                  = string
    topic                 = string
    table                 = string
    max_delivery_attempts = optional(number, 10)
  }))
  description = "Subscriptions that write every message as a row of a BigQuery table (PROJECT.DATASET.TABLE) with the subscription's metadata columns; topic is a key of var.topics. Rows that cannot be written end on the dead-letter topic."
  default     = {}

  validation {
    condition     = alltrue([for s in values(var.bigquery_subscriptions) : s.max_delivery_attempts >= 5 && s.max_delivery_attempts <= 100])
    error_message = "max_delivery_attempts must be between 5 and 100 (the bounds Pub/Sub accepts for dead-lettering)."
  }
}

variable "push_invoker_service_account_email" {
  type        = string
  description = "Service account whose OIDC token Pub/Sub attaches to every push request; it holds roles/run.invoker on the functions and nothing else."
}

variable "pubsub_service_agent_email" {
  type        = string
  description = "Email of the project's Pub/Sub service agent (service-PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com); it forwards failed messages and mints the push OIDC tokens."
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to every topic and subscription."
  default     = {}
}
