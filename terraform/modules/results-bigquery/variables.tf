variable "project_id" {
  type        = string
  description = "Project that owns the dataset."
}

variable "dataset_id" {
  type        = string
  description = "BigQuery dataset that holds the result events table."

  validation {
    condition     = can(regex("^[A-Za-z0-9_]{1,1024}$", var.dataset_id))
    error_message = "dataset_id may contain only letters, digits and underscores."
  }
}

variable "table_id" {
  type        = string
  description = "Table the BigQuery subscription writes one row per result event to."
}

variable "location" {
  type        = string
  description = "Dataset location (a region or a multi-region such as US or EU)."
}

variable "schema" {
  type        = string
  description = "The table's schema as BigQuery JSON (terraform/schemas/result_events.json): the columns a subscription with write_metadata fills."
}

variable "partition_expiration_days" {
  type        = number
  description = "Days a day's partition of events is kept; 0 keeps them forever."

  validation {
    condition     = var.partition_expiration_days >= 0
    error_message = "partition_expiration_days must be 0 or more."
  }
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse to destroy the table (and the events in it) on terraform destroy."
}

variable "writer_service_account_email" {
  type        = string
  description = "The Pub/Sub service agent, which writes the BigQuery subscription's rows."
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to the dataset and the table."
  default     = {}
}
