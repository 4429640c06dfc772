output "rayservice" {
  description = "The RayService manifest (YAML) with the deployments of var.models."
  value       = yamlencode(local.rayservice)

  precondition {
    condition     = length(local.unsized_names) == 0
    error_message = "infra/k8s/rayservice.yaml has no deployments entry for ${join(", ", local.unsized_names)}: add one (sizing and autoscaling) for each model in `models`."
  }

  precondition {
    condition     = length(local.floors_above_ceiling) == 0
    error_message = "model_autoscaling sets min_replicas above the deployment's max_replicas for ${join(", ", local.floors_above_ceiling)}."
  }

  precondition {
    condition     = length(local.unknown_models) == 0
    error_message = "model_autoscaling names ${join(", ", local.unknown_models)}, not in models (${join(", ", var.models)})."
  }

  precondition {
    condition     = contains(var.models, lookup(var.template_vars, "default_model", ""))
    error_message = "default_model (${lookup(var.template_vars, "default_model", "")}) must be one of models (${join(", ", var.models)})."
  }
}

output "documents" {
  description = "The other manifests (YAML), keyed by template name."
  value       = local.rendered
}

output "secret_documents" {
  description = "The manifests that carry credentials (YAML), keyed by template name."
  value       = local.secrets
  sensitive   = true
}

output "rayservice_name" {
  description = "Name of the RayService object."
  value       = local.rayservice.metadata.name
}

output "serve_service_name" {
  description = "Name of the Kubernetes Service (internal load balancer) KubeRay creates in front of Ray Serve."
  value       = local.rayservice.spec.serveService.metadata.name
}
