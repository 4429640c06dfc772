output "network_id" {
  description = "VPC id."
  value       = google_compute_network.this.id
}

output "network_name" {
  description = "VPC name."
  value       = google_compute_network.this.name
}

output "nodes_subnetwork_name" {
  description = "Name of the GKE node subnet."
  value       = google_compute_subnetwork.nodes.name
}

output "pods_range_name" {
  description = "Secondary range name for pods."
  value       = google_compute_subnetwork.nodes.secondary_ip_range[0].range_name
}

output "services_range_name" {
  description = "Secondary range name for services."
  value       = google_compute_subnetwork.nodes.secondary_ip_range[1].range_name
}

output "vpc_connector_id" {
  description = "Serverless VPC Access connector id for the functions."
  value       = google_vpc_access_connector.this.id
}

output "serve_address" {
  description = "Reserved internal IP of the Ray Serve load balancer."
  value       = google_compute_address.serve.address
}

output "serve_address_name" {
  description = "Name of the reserved internal address of the Ray Serve load balancer (the Service refers to it by name)."
  value       = google_compute_address.serve.name
}

output "ip_ranges" {
  description = "The CIDR ranges in use."
  value       = var.ip_ranges
}
