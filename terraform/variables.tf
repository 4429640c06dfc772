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
  description = "TRIGGERFISH_DEFAULT_MODEL: model used when a request names none; it must be one of models."
  default     = "mobilenet_v2"
}

variable "function_source_archive" {
  type        = string
  description = "Path of the functions' source zip; empty means build/functions-source.zip in the repository (python -m infra.packaging.package_functions --out build/functions-source.zip)."
  default     = ""
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
  description = "Pinned version of the kuberay-operator Helm chart (https://ray-project.github.io/kuberay-helm/) and operator image tag. 1.7.0 is the first release whose samples run Serve's HAProxy data plane (RAY_SERVE_ENABLE_HA_PROXY), as infra/k8s/rayservice.yaml does."
  default     = "1.7.0"
}

variable "serve_image_digest" {
  type        = string
  description = "Digest (sha256:...) of the pushed Serve image (infra/docker/Dockerfile.gpu). The cluster runs the image by digest, never by a tag that could move. Empty only while bootstrapping (the RayService refuses to deploy without it)."
  default     = ""

  validation {
    condition     = var.serve_image_digest == "" || can(regex("^sha256:[0-9a-f]{64}$", var.serve_image_digest))
    error_message = "serve_image_digest must look like sha256:<64 hex digits> (docker buildx imagetools inspect IMAGE:TAG, or gcloud artifacts docker images describe IMAGE:TAG)."
  }
}

variable "serve_image_repository" {
  type        = string
  description = "Repository of the Serve image without tag or digest; empty means REGION-docker.pkg.dev/PROJECT/NAME_PREFIX-serve/serve-gpu. It must be admitted by the Binary Authorization policy (binauthz.tf)."
  default     = ""
}

variable "models" {
  type        = list(string)
  description = "Models the Serve application deploys (TRIGGERFISH_MODELS). Each needs a Model_<name> entry under deployments in infra/k8s/rayservice.yaml; they start before their files are in the models bucket and answer 503 until a version appears."
  default     = ["mobilenet_v2", "text_detector"]
}

variable "model_autoscaling" {
  type = map(object({
    min_replicas              = optional(number)
    downscale_to_zero_delay_s = optional(number)
  }))
  description = "Per model (key: a name in models): min_replicas (0, the manifest's default, lets the model and with it the GPU pool scale to zero; 1 keeps a replica warm) and downscale_to_zero_delay_s (idle seconds before the last replica stops; manifest default 900). Fields left out keep infra/k8s/rayservice.yaml's values."
  default     = {}
}

variable "extra_serve_invokers" {
  type        = list(string)
  description = "Service account emails besides the functions' that may call Serve (TRIGGERFISH_ALLOWED_INVOKERS), e.g. a backfill job's; they still need a network path from the VPC connector range."
  default     = []

  validation {
    condition     = alltrue([for email in var.extra_serve_invokers : can(regex("^[^@,\\s]+@[^@,\\s]+\\.iam\\.gserviceaccount\\.com$", email))])
    error_message = "extra_serve_invokers must be service account emails (NAME@PROJECT.iam.gserviceaccount.com)."
  }
}

variable "gcs_redis" {
  type = object({
    tier              = optional(string, "STANDARD_HA")
    memory_size_gb    = optional(number, 1)
    redis_version     = optional(string, "REDIS_7_2")
    reserved_ip_range = optional(string, "10.30.0.0/28")
  })
  description = "Memorystore for Redis that makes the Ray head fault tolerant (GCS fault tolerance): tier (STANDARD_HA fails over across zones; BASIC is cheaper and single-zone), size in GB, Redis version, and a /28 of the VPC not used by ip_ranges."
  default     = {}
}

variable "alert_notification_channels" {
  type        = list(string)
  description = "Cloud Monitoring notification channel ids (projects/PROJECT/notificationChannels/ID) for the alert policies; empty means the alerts show in the console only."
  default     = []
}

variable "alert_thresholds" {
  type = object({
    dead_letter_messages        = optional(number, 0)
    dead_letter_age_seconds     = optional(number, 3600)
    function_errors_per_second  = optional(number, 0.1)
    function_errors_for_seconds = optional(number, 1800)
    serve_error_ratio           = optional(number, 0.05)
    serve_p95_seconds           = optional(number, 2.5)
  })
  description = "Alert thresholds: dead letters waiting (count; age of the oldest in seconds), function 5xx per second and for how long (longer than a scale-from-zero cold start), Serve share of requests whose status is not ok, Serve p95 latency in seconds."
  default     = {}
}

variable "results_bigquery" {
  type = object({
    enabled                   = optional(bool, false)
    dataset                   = optional(string, "triggerfish")
    table                     = optional(string, "result_events")
    location                  = optional(string, "")
    partition_expiration_days = optional(number, 400)
    deletion_protection       = optional(bool, true)
  })
  description = "Optional BigQuery table of result events: a dataset, a table partitioned by day (schema in terraform/schemas/result_events.json) and a BigQuery subscription on the results topic that writes every event as a row. location empty means var.region; partition_expiration_days 0 keeps rows forever; deletion_protection (default true) keeps terraform destroy from deleting the table: set it to false and apply first."
  default     = {}
}
