variable "manifests_dir" {
  type        = string
  description = "Folder holding the manifest templates (infra/k8s in the repository)."
}

variable "template_vars" {
  type        = map(string)
  description = "Values of the $${...} placeholders of the templates, except models (derived from var.models) and the secrets."
}

variable "models" {
  type        = list(string)
  description = "Models the Serve application deploys (TRIGGERFISH_MODELS); each needs a Model_<name> entry under deployments in rayservice.yaml."

  validation {
    condition     = length(var.models) > 0 && length(distinct(var.models)) == length(var.models)
    error_message = "models must list at least one model, each once."
  }

  validation {
    condition     = alltrue([for model in var.models : can(regex("^[A-Za-z0-9][A-Za-z0-9_.-]*$", model))])
    error_message = "Model names are letters, digits, '_', '.' and '-' (they name folders of the model repository and Serve deployments)."
  }
}

variable "model_autoscaling" {
  type = map(object({
    min_replicas              = optional(number)
    downscale_to_zero_delay_s = optional(number)
  }))
  description = "Per model (key: a name in models): min_replicas (0 lets the model scale to zero) and downscale_to_zero_delay_s (idle seconds before its last replica stops). Null fields keep infra/k8s/rayservice.yaml's values."
  default     = {}

  validation {
    condition = alltrue([
      for s in values(var.model_autoscaling) :
      (s.min_replicas == null ? true : s.min_replicas >= 0 && floor(s.min_replicas) == s.min_replicas)
      && (s.downscale_to_zero_delay_s == null ? true : s.downscale_to_zero_delay_s >= 0)
    ])
    error_message = "model_autoscaling: min_replicas must be a whole number >= 0 and downscale_to_zero_delay_s >= 0."
  }
}

variable "plain_templates" {
  type        = list(string)
  description = "Templates (file names without .yaml) rendered as they are, besides rayservice."
  default     = ["namespace", "serviceaccount", "networkpolicy", "poddisruptionbudget", "redis-ca"]
}

variable "secret_templates" {
  type        = list(string)
  description = "Templates rendered with var.secret_vars as well; their output is sensitive."
  default     = ["redis-secret"]
}

variable "secret_vars" {
  type        = map(string)
  description = "Values of the placeholders that only the secret templates use (base64-encoded credentials)."
  sensitive   = true
}
