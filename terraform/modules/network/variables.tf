variable "project_id" {
  type        = string
  description = "Project that owns the network."
}

variable "region" {
  type        = string
  description = "Region of the subnets, the VPC connector, Cloud NAT and the Serve address."
}

variable "name" {
  type        = string
  description = "Name prefix of every network resource."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,14}$", var.name))
    error_message = "name must be 2-15 lowercase letters, digits or hyphens (the VPC connector name is limited to 25 characters)."
  }
}

variable "ip_ranges" {
  type = object({
    nodes     = string
    pods      = string
    services  = string
    connector = string
  })
  description = "CIDR ranges: GKE nodes (primary range of the subnet), pods and services (secondary ranges), and the /28 used by the Serverless VPC Access connector."
  default = {
    nodes     = "10.10.0.0/20"
    pods      = "10.20.0.0/14"
    services  = "10.24.0.0/20"
    connector = "10.8.0.0/28"
  }

  validation {
    condition     = endswith(var.ip_ranges.connector, "/28")
    error_message = "The VPC connector range must be a /28."
  }
}

variable "node_network_tag" {
  type        = string
  description = "Network tag carried by the GKE nodes; the firewall rule for Serve targets it."
}

variable "serve_port" {
  type        = number
  description = "Ray Serve HTTP port behind the internal load balancer."
  default     = 8000
}

variable "connector_machine_type" {
  type        = string
  description = "Machine type of the VPC connector instances."
  default     = "e2-micro"
}

variable "connector_instances" {
  type = object({
    min = number
    max = number
  })
  description = "Minimum and maximum number of VPC connector instances."
  default = {
    min = 2
    max = 3
  }
}
