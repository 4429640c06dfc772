variable "project_id" {
  type        = string
  description = "Google Cloud project id. It also prefixes every bucket name (PROJECT-triggerfish-images, ...)."
}

variable "region" {
  type        = string
  description = "Region of the functions, buckets, subnets and Artifact Registry."
  default     = "us-central1"
}

variable "zone" {
  type        = string
  description = "Zone of the GKE cluster and its GPU nodes (pick one with capacity for gpu_pool.accelerator_type)."
  default     = "us-central1-a"
}

variable "name_prefix" {
  type        = string
  description = "Prefix of service accounts, the cluster, functions, network resources and repositories."
  default     = "triggerfish"

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,12}$", var.name_prefix))
    error_message = "name_prefix must be 2-13 lowercase letters, digits or hyphens, starting with a letter (service account ids such as NAME_PREFIX-functions-build are limited to 30 characters)."
  }
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to every resource that takes labels."
  default     = { app = "triggerfish" }
}

variable "activate_apis" {
  type        = bool
  description = "Enable the Google APIs the system uses (set to false where a platform team manages them)."
  default     = true
}

variable "bucket_location" {
  type        = string
  description = "Location of the buckets; empty means var.region."
  default     = ""
}

variable "images_retention_days" {
  type        = number
  description = "Uploaded images are deleted this many days after upload (results keep the source URI and generation)."
  default     = 30

  validation {
    condition     = var.images_retention_days >= 1
    error_message = "images_retention_days must be at least 1."
  }
}

variable "engine_cache_retention_days" {
  type        = number
  description = "Cached TensorRT engines older than this are deleted; replicas rebuild them from ONNX on demand."
  default     = 90
}

variable "noncurrent_retention_days" {
  type        = number
  description = "Overwritten versions of results and models are kept this many days."
  default     = 30
}

variable "extra_source_buckets" {
  type        = list(string)
  description = "Buckets besides the images bucket that requests may name (TRIGGERFISH_ALLOWED_BUCKETS); the Serve account gets read access to each."
  default     = []
}

variable "default_model" {
  type        = string
  description = "TRIGGERFISH_DEFAULT_MODEL: model used when a request names none. infra/k8s/rayservice.yaml must deploy Model_<name> for it."
  default     = "mobilenet_v2"
}

variable "request_timeout_s" {
  type        = number
  description = "TRIGGERFISH_REQUEST_TIMEOUT_S: how long a function waits for Serve before failing (and being retried). Must be below the functions' timeout (the subscription ack deadline)."
  default     = 60
}

variable "function_source_archive" {
  type        = string
  description = "Path of the functions' source zip; empty means build/functions-source.zip in the repository (python -m infra.package_functions --out build/functions-source.zip)."
  default     = ""
}

variable "function_max_instances" {
  type        = number
  description = "Upper bound of instances per function; it also bounds the concurrent load the functions put on Serve."
  default     = 20
}

variable "master_authorized_networks" {
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  description = "CIDR blocks allowed to reach the GKE control plane (where terraform and kubectl run). Required; 0.0.0.0/0 is refused."
}

variable "ip_ranges" {
  type = object({
    nodes     = string
    pods      = string
    services  = string
    connector = string
  })
  description = "CIDR ranges of the VPC: GKE nodes, pods, services and the /28 of the VPC connector."
  default = {
    nodes     = "10.10.0.0/20"
    pods      = "10.20.0.0/14"
    services  = "10.24.0.0/20"
    connector = "10.8.0.0/28"
  }
}

variable "master_ipv4_cidr_block" {
  type        = string
  description = "/28 range of the GKE control plane's private endpoint."
  default     = "172.16.0.0/28"
}

variable "gke_release_channel" {
  type        = string
  description = "GKE release channel (RAPID, REGULAR or STABLE)."
  default     = "REGULAR"
}

variable "cpu_pool" {
  type = object({
    machine_type   = string
    min_node_count = number
    max_node_count = number
    disk_size_gb   = optional(number, 100)
  })
  description = "CPU node pool (Ray head, Ingress workers, KubeRay operator)."
  default = {
    machine_type   = "e2-standard-8"
    min_node_count = 1
    max_node_count = 3
  }
}

variable "gpu_pool" {
  type = object({
    machine_type       = string
    accelerator_type   = string
    accelerator_count  = number
    max_node_count     = number
    gpu_driver_version = optional(string, "LATEST")
    node_locations     = optional(list(string))
    spot               = optional(bool, false)
    disk_size_gb       = optional(number, 200)
  })
  description = "GPU node pool: machine type, accelerator type and count per node, autoscaling ceiling (the floor is 0), driver version, spot capacity."
  default = {
    machine_type      = "g2-standard-8"
    accelerator_type  = "nvidia-l4"
    accelerator_count = 1
    max_node_count    = 2
  }
}

variable "deletion_protection" {
  type        = bool
  description = "Protect the GKE cluster from `terraform destroy` (set to false and apply before tearing down)."
  default     = true
}

variable "kuberay_chart_version" {
  type        = string
  description = "Pinned version of the kuberay-operator Helm chart (https://ray-project.github.io/kuberay-helm/)."
  default     = "1.5.1"
}

variable "ray_version" {
  type        = string
  description = "Ray version baked into the Serve image (build arg RAY_VERSION); KubeRay reads it as rayVersion."
  default     = "2.60.0"
}

variable "serve_image" {
  type        = string
  description = "Full reference of the Ray Serve image; empty means REGION-docker.pkg.dev/PROJECT/NAME_PREFIX-serve/serve-gpu:serve_image_tag."
  default     = ""
}

variable "serve_image_tag" {
  type        = string
  description = "Tag of the Serve image in the project's repository (used when serve_image is empty)."
  default     = "0.1.0"
}
