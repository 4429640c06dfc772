output "namespace" {
  description = "Namespace of the RayService."
  value       = var.namespace
}

output "rayservice_name" {
  description = "Name of the RayService object."
  value       = local.rayservice.metadata.name
}

output "serve_service_name" {
  description = "Kubernetes Service (internal load balancer) in front of Ray Serve."
  value       = local.rayservice.spec.serveService.metadata.name
}

output "kuberay_chart_version" {
  description = "Installed kuberay-operator chart version."
  value       = helm_release.kuberay_operator.version
}
