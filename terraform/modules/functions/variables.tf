variable "project_id" {
  type        = string
  description = "Project that runs the functions."
}

variable "region" {
  type        = string
  description = "Region of the functions and of their VPC connector."
}

variable "functions" {
  type = map(object({
    name                             = string
    entry_point                      = string
    description                      = string
    timeout_seconds                  = number
    available_memory                 = optional(string, "512Mi")
    available_cpu                    = optional(string, "1")
    min_instance_count               = optional(number, 0)
    max_instance_count               = optional(number, 20)
    max_instance_request_concurrency = optional(number, 1)
  }))
  description = "Cloud Functions (gen2), keyed by footprint subscription key. entry_point names a CloudEvent function in functions/main.py. timeout_seconds bounds one invocation and must stay below the subscription's ack deadline."

  validation {
    condition     = alltrue([for f in values(var.functions) : can(regex("^[a-z][a-z0-9-]{0,61}[a-z0-9]$", f.name))])
    error_message = "Function names must be lowercase letters, digits and hyphens (they name the Cloud Run service too)."
  }

  validation {
    condition     = alltrue([for f in values(var.functions) : f.timeout_seconds >= 1 && f.timeout_seconds <= 540])
    error_message = "timeout_seconds must be between 1 and 540 for event-driven functions."
  }
}

variable "runtime" {
  type        = string
  description = "Cloud Functions runtime."
  default     = "python311"
}

variable "source_archive_path" {
  type        = string
  description = "Local path of the source zip built by `python -m infra.packaging.package_functions --out build/functions-source.zip`."
}

variable "source_bucket" {
  type        = string
  description = "Bucket that stores the source zips; each zip is named by its sha256 so a code change redeploys the functions."
}

variable "service_account_email" {
  type        = string
  description = "Runtime service account of the functions (forwards to Serve, writes error results)."
}

variable "build_service_account_id" {
  type        = string
  description = "Fully qualified id (projects/PROJECT/serviceAccounts/EMAIL) of the service account Cloud Build uses to build the functions."
}

variable "build_docker_repository" {
  type        = string
  description = "Artifact Registry repository (projects/PROJECT/locations/REGION/repositories/NAME) that receives the built function images."
}

variable "invoker_service_account_email" {
  type        = string
  description = "Service account that Pub/Sub push subscriptions authenticate as; it gets roles/run.invoker on each function's Cloud Run service."
}

variable "environment_variables" {
  type        = map(string)
  description = "Runtime environment of every function (TRIGGERFISH_* settings and GOOGLE_CLOUD_PROJECT)."
}

variable "request_timeout_s" {
  type        = number
  description = "TRIGGERFISH_REQUEST_TIMEOUT_S: how long a function waits for Serve. Checked against each function's timeout."
}

variable "serve_request_timeout_s" {
  type        = number
  description = "TRIGGERFISH_REQUEST_TIMEOUT_S of the Serve application; checked to be below request_timeout_s, so Serve gives up on a request before the function waiting for it does."
}

variable "vpc_connector" {
  type        = string
  description = "Serverless VPC Access connector id through which the functions reach the internal load balancer of Ray Serve."
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to the functions and the source object."
  default     = {}
}
