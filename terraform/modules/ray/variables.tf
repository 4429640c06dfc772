variable "project_id" {
  type        = string
  description = "Project of the cluster (workload identity pool PROJECT.svc.id.goog)."
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
  description = "Version of the kuberay-operator Helm chart (pinned; it also pins the CRDs)."
}

variable "kuberay_namespace" {
  type        = string
  description = "Namespace of the KubeRay operator."
  default     = "kuberay-system"
}

variable "image" {
  type        = string
  description = "Ray Serve worker image (infra/docker/Dockerfile.gpu) used by the head and all worker groups."
}

variable "ray_version" {
  type        = string
  description = "Ray version inside the image (rayClusterConfig.rayVersion)."
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

variable "serve_ip" {
  type        = string
  description = "Reserved internal IP of the Serve load balancer."
}

variable "connector_cidr" {
  type        = string
  description = "Range of the VPC connector (Cloud Functions); allowed to reach Serve."
}

variable "nodes_cidr" {
  type        = string
  description = "Node subnet range; allowed to reach Serve."
}

variable "serve_environment" {
  type = object({
    models_bucket       = string
    engine_cache_bucket = string
    results_bucket      = string
    allowed_buckets     = list(string)
    default_model       = string
  })
  description = "Buckets and default model passed to the Serve replicas as TRIGGERFISH_* variables."
}
