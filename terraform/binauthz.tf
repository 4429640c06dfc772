# Binary Authorization: the cluster (modules/gke) enforces this project
# policy. It replaces the default admit-all rule: only images from the
# project's own repositories for the cluster (the Serve image, and the KubeRay
# operator through the quay.io remote repository) and GKE's system images
# (global policy evaluation) may run; everything else is blocked and logged.
#
# The policy is a singleton of the project: applying it replaces any policy
# set before, and destroying it restores the default.
locals {
  admitted_image_patterns = [
    "${local.registry_host}/${var.project_id}/${google_artifact_registry_repository.this["serve"].repository_id}/**",
    "${local.registry_host}/${var.project_id}/${google_artifact_registry_repository.upstream["quay"].repository_id}/kuberay/**",
  ]
}

resource "google_binary_authorization_policy" "this" {
  project                       = var.project_id
  description                   = "triggerfish: images from the project's Artifact Registry and GKE system images only."
  global_policy_evaluation_mode = "ENABLE"

  dynamic "admission_whitelist_patterns" {
    for_each = toset(local.admitted_image_patterns)

    content {
      name_pattern = admission_whitelist_patterns.value
    }
  }

  default_admission_rule {
    evaluation_mode  = "ALWAYS_DENY"
    enforcement_mode = "ENFORCED_BLOCK_AND_AUDIT_LOG"
  }

  depends_on = [google_project_service.this]
}
