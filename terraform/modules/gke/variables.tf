variable "project_id" {
  type        = string
  description = "Project that owns the cluster."
}

variable "name" {
  type        = string
  description = "Cluster name."
}

variable "location" {
  type        = string
  description = "Cluster location. A zone keeps the control plane free of charge and the GPU pool in one zone with capacity; a region spreads the control plane."
}

variable "network" {
  type        = string
  description = "VPC id or name."
}

variable "subnetwork" {
  type        = string
  description = "Node subnet name."
}

variable "pods_range_name" {
  type        = string
  description = "Secondary range of the subnet used for pod IPs (VPC-native cluster)."
}

variable "services_range_name" {
  type        = string
  description = "Secondary range of the subnet used for service IPs."
}

variable "master_ipv4_cidr_block" {
  type        = string
  description = "/28 range of the private control plane endpoint."
  default     = "172.16.0.0/28"
}

variable "master_authorized_networks" {
  type = list(object({
    cidr_block   = string
    display_name = string
  }))
  description = "CIDR blocks allowed to reach the control plane's public endpoint (where terraform, helm and kubectl run from)."

  validation {
    condition     = length(var.master_authorized_networks) > 0 && alltrue([for n in var.master_authorized_networks : n.cidr_block != "0.0.0.0/0"])
    error_message = "List at least one authorized network, and never 0.0.0.0/0."
  }
}

variable "release_channel" {
  type        = string
  description = "GKE release channel."
  default     = "REGULAR"

  validation {
    condition     = contains(["RAPID", "REGULAR", "STABLE"], var.release_channel)
    error_message = "release_channel must be RAPID, REGULAR or STABLE."
  }
}

variable "node_service_account_email" {
  type        = string
  description = "Least-privilege service account of the nodes (logging, monitoring, image pulls)."
}

variable "node_network_tag" {
  type        = string
  description = "Network tag of every node (firewall rules target it)."
}

variable "cpu_pool" {
  type = object({
    machine_type   = string
    min_node_count = number
    max_node_count = number
    disk_size_gb   = optional(number, 100)
  })
  description = "CPU node pool for the Ray head and the Ingress workers."
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
  description = "GPU node pool for the Ray Serve model replicas. It autoscales from zero and is tainted nvidia.com/gpu=present:NoSchedule."
  default = {
    machine_type      = "g2-standard-8"
    accelerator_type  = "nvidia-l4"
    accelerator_count = 1
    max_node_count    = 2
  }

  validation {
    condition     = var.gpu_pool.accelerator_count >= 1 && var.gpu_pool.max_node_count >= 1
    error_message = "The GPU pool needs at least one accelerator per node and max_node_count >= 1."
  }

  validation {
    condition     = contains(["DEFAULT", "LATEST", "INSTALLATION_DISABLED"], var.gpu_pool.gpu_driver_version)
    error_message = "gpu_driver_version must be DEFAULT, LATEST or INSTALLATION_DISABLED."
  }
}

variable "deletion_protection" {
  type        = bool
  description = "Refuse to destroy the cluster (set to false and apply before `terraform destroy`)."
  default     = true
}

variable "labels" {
  type        = map(string)
  description = "Labels applied to the cluster and its nodes."
  default     = {}
}
