# Artifact Registry: the Ray Serve image (pushed by the operator, pulled by
# the GKE nodes) and the images Cloud Build produces for the functions.
# Separate repositories keep each writer confined to its own images.
resource "google_artifact_registry_repository" "this" {
  for_each = {
    serve     = "Ray Serve worker images (infra/docker/Dockerfile.gpu)."
    functions = "Images built by Cloud Build for the triggerfish Cloud Functions."
  }

  # checkov:skip=CKV_GCP_84: The repositories hold images built from this public source tree, not customer data; Google-managed encryption at rest is the deliberate choice and avoids a KMS key ring whose loss would make the images unpullable.
  project       = var.project_id
  location      = var.region
  repository_id = "${var.name_prefix}-${each.key}"
  format        = "DOCKER"
  description   = each.value
  labels        = local.labels

  depends_on = [google_project_service.this]
}
