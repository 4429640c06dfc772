variable "project_id" {
  type        = string
  description = "Project that owns the buckets."
}

variable "location" {
  type        = string
  description = "Bucket location (a region close to the GKE cluster keeps reads cheap and fast)."
}

variable "buckets" {
  type = map(object({
    name          = string
    versioning    = bool
    force_destroy = optional(bool, false)
    storage_class = optional(string, "STANDARD")
    lifecycle_rules = optional(list(object({
      action = object({
        type          = string
        storage_class = optional(string)
      })
      condition = object({
        age                        = optional(number)
        num_newer_versions         = optional(number)
        with_state                 = optional(string)
        days_since_noncurrent_time = optional(number)
        matches_prefix             = optional(list(string))
      })
    })), [])
  }))
  description = "Buckets keyed by role (images, results, models, engine_cache, function_source). Every bucket gets uniform bucket-level access and enforced public access prevention; versioning and lifecycle rules are per bucket."

  validation {
    condition     = alltrue([for b in values(var.buckets) : length(b.name) >= 3 && length(b.name) <= 63])
    error_message = "Bucket names must be 3 to 63 characters long."
  }

  validation {
    condition = alltrue(flatten([
      for b in values(var.buckets) : [for r in b.lifecycle_rules : contains(["Delete", "SetStorageClass", "AbortIncompleteMultipartUpload"], r.action.type)]
    ]))
    error_message = "Lifecycle action type must be Delete, SetStorageClass or AbortIncompleteMultipartUpload."
  }
}

variable "upload_notification" {
  type = object({
    bucket      = string
    topic       = string
    event_types = list(string)
  })
  description = "Pub/Sub notification for new objects: bucket is a key of var.buckets, topic the id of the topic to publish to (payload JSON_API_V1)."

  validation {
    condition     = length(var.upload_notification.event_types) > 0 && alltrue([for t in var.upload_notification.event_types : contains(["OBJECT_FINALIZE", "OBJECT_METADATA_UPDATE", "OBJECT_DELETE", "OBJECT_ARCHIVE"], t)])
    error_message = "event_types must list Cloud Storage notification event types, e.g. [\"OBJECT_FINALIZE\"]."
  }
}

variable "result_notification" {
  type = object({
    bucket      = string
    topic       = string
    event_types = list(string)
  })
  description = "Pub/Sub notification for stored results: bucket is a key of var.buckets (the results bucket), topic the id of the results-events topic (payload JSON_API_V1, which carries each result's custom metadata)."

  validation {
    condition     = length(var.result_notification.event_types) > 0 && alltrue([for t in var.result_notification.event_types : contains(["OBJECT_FINALIZE", "OBJECT_METADATA_UPDATE", "OBJECT_DELETE", "OBJECT_ARCHIVE"], t)])
    error_message = "event_types must list Cloud Storage notification event types, e.g. [\"OBJECT_FINALIZE\"]."
  }
}

variable "gcs_service_agent_email" {
  type        = string
  description = "Email of the project's Cloud Storage service agent, which publishes bucket notifications."
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to every bucket."
  default     = {}
}
