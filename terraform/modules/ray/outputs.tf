output "namespace" {
  description = "Namespace of the RayService."
  value       = var.namespace
}

output "rayservice_name" {
  description = "Name of the RayService object."
  value       = module.manifests.rayservice_name
}

output "serve_service_name" {
  description = "Kubernetes Service (internal load balancer) in front of Ray Serve."
  value       = module.manifests.serve_service_name
}

output "kuberay_chart_version" {
  description = "Installed kuberay-operator chart version."
  value       = helm_release.kuberay_operator.version
}

output "gcs_redis" {
  description = "Memorystore instance backing GCS fault tolerance (name and host:port)."
  value = {
    name    = google_redis_instance.gcs.name
    address = "${google_redis_instance.gcs.host}:${google_redis_instance.gcs.port}"
  }
}

output "rayservice_id" {
  description = "Id of the applied RayService manifest (other modules depend on it being in place)."
  value       = kubectl_manifest.rayservice.id
}
