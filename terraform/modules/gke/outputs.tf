output "name" {
  description = "Cluster name."
  value       = google_container_cluster.this.name
}

output "location" {
  description = "Cluster location."
  value       = google_container_cluster.this.location
}

output "endpoint" {
  description = "Control plane endpoint (IP address)."
  value       = google_container_cluster.this.endpoint
  sensitive   = true
}

output "ca_certificate" {
  description = "Base64-encoded cluster CA certificate."
  value       = google_container_cluster.this.master_auth[0].cluster_ca_certificate
  sensitive   = true
}

output "workload_pool" {
  description = "Workload identity pool (PROJECT.svc.id.goog)."
  value       = google_container_cluster.this.workload_identity_config[0].workload_pool
}

output "cpu_node_pool" {
  description = "Name of the CPU node pool."
  value       = google_container_node_pool.cpu.name
}

output "gpu_node_pool" {
  description = "Name of the GPU node pool."
  value       = google_container_node_pool.gpu.name
}

output "gpu_taint" {
  description = "Taint carried by the GPU nodes (Kubernetes spelling of the effect)."
  value = {
    key    = google_container_node_pool.gpu.node_config[0].taint[0].key
    value  = google_container_node_pool.gpu.node_config[0].taint[0].value
    effect = "NoSchedule"
  }
}
