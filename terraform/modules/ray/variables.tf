variable "project_id" {
  type        = string
  description = "Project of the cluster (workload identity pool PROJECT.svc.id.goog) and of the Redis instance."
}

variable "region" {
  type        = string
  description = "Region of the Memorystore instance (the cluster's region)."
}

variable "name" {
  type        = string
  description = "Name prefix of the Memorystore instance."
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to the Memorystore instance."
  default     = {}
}

variable "manifests_dir" {
  type        = string
  description = "Folder holding the Kubernetes manifest templates (infra/k8s in the repository)."
}

variable "namespace" {
  type        = string
  description = "Namespace of the RayService."
  default     = "triggerfish"
}

variable "service_account_name" {
  type        = string
  description = "Kubernetes service account of the Ray pods, bound to var.serve_gsa_email through workload identity."
  default     = "ray-serve"
}

variable "serve_gsa_email" {
  type        = string
  description = "Google service account the Ray pods act as."
}

variable "kuberay_chart_version" {
  type        = string
  description = "Version of the kuberay-operator Helm chart (pinned; it also pins the CRDs and the operator image tag)."
}

variable "kuberay_namespace" {
  type        = string
  description = "Namespace of the KubeRay operator."
  default     = "kuberay-system"
}

variable "kuberay_image_repository" {
  type        = string
  description = "Registry path that serves quay.io's images (an Artifact Registry remote repository): REGION-docker.pkg.dev/PROJECT/REPOSITORY."
}

variable "image" {
  type        = string
  description = "Ray Serve image (infra/docker/Dockerfile.gpu) by digest, REPOSITORY@sha256:..., used by the head and all worker groups."
}

variable "ray_version" {
  type        = string
  description = "Ray version inside the image (rayClusterConfig.rayVersion), from requirements/RAY_VERSION."
}

variable "cpu_node_pool" {
  type        = string
  description = "Node pool of the Ray head and CPU workers."
}

variable "gpu_node_pool" {
  type        = string
  description = "Node pool of the GPU workers."
}

variable "gpus_per_worker" {
  type        = number
  description = "nvidia.com/gpu requested by each GPU worker pod (the accelerators of one GPU node)."
}

variable "gpu_worker_max_replicas" {
  type        = number
  description = "Upper bound of GPU worker pods (one per GPU node)."
}

variable "serve_address_name" {
  type        = string
  description = "Name of the reserved internal address of the Serve load balancer (networking.gke.io/load-balancer-ip-addresses)."
}

variable "connector_cidr" {
  type        = string
  description = "Range of the VPC connector (Cloud Functions): the only source allowed to reach Serve."
}

variable "network_id" {
  type        = string
  description = "VPC the Memorystore instance is peered with (the cluster's network)."
}

variable "gcs_redis" {
  type = object({
    tier              = string
    memory_size_gb    = number
    redis_version     = string
    reserved_ip_range = string
  })
  description = "Memorystore for Redis backing GCS fault tolerance: tier (STANDARD_HA replicates across zones), size, version, and a free /28 in the VPC."

  validation {
    condition     = contains(["BASIC", "STANDARD_HA"], var.gcs_redis.tier)
    error_message = "gcs_redis.tier must be BASIC or STANDARD_HA."
  }
}

variable "model_autoscaling" {
  type = map(object({
    min_replicas              = optional(number)
    downscale_to_zero_delay_s = optional(number)
  }))
  description = "Per-model overrides of min_replicas and downscale_to_zero_delay_s (see modules/ray-manifests)."
  default     = {}
}

variable "serve_environment" {
  type = object({
    models              = list(string)
    models_bucket       = string
    engine_cache_bucket = string
    results_bucket      = string
    allowed_buckets     = list(string)
    default_model       = string
    serve_audience      = string
    allowed_invokers    = list(string)
    request_timeout_s   = number
  })
  description = "Settings passed to the Serve application as TRIGGERFISH_* variables: models, buckets, default model, the ID token audience and invoker accounts the ingress accepts, and Serve's request timeout."
}
