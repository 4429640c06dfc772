# Artifact Registry: the Ray Serve image (pushed by the operator, pulled by
# the GKE nodes), the images Cloud Build produces for the functions, and a
# remote repository in front of quay.io for the KubeRay operator image.
# Separate repositories keep each writer confined to its own images; Binary
# Authorization (binauthz.tf) admits images from the serve and quay
# repositories only.
resource "google_artifact_registry_repository" "this" {
  for_each = {
    serve = {
      description = "Ray Serve worker images (infra/docker/Dockerfile.gpu)."
      # A tag, once pushed, always names the same image; the cluster runs the
      # image by digest anyway.
      immutable_tags = true
    }
    functions = {
      description = "Images built by Cloud Build for the triggerfish Cloud Functions."
      # Cloud Functions rewrites its own tags on every deployment.
      immutable_tags = false
    }
  }

  # checkov:skip=CKV_GCP_84: The repositories hold images built from this public source tree, not customer data; Google-managed encryption at rest is the deliberate choice and avoids a KMS key ring whose loss would make the images unpullable.
  project       = var.project_id
  location      = var.region
  repository_id = "${var.name_prefix}-${each.key}"
  format        = "DOCKER"
  description   = each.value.description
  labels        = local.labels

  docker_config {
    immutable_tags = each.value.immutable_tags
  }

  depends_on = [google_project_service.this]
}

# The private nodes pull the KubeRay operator through this remote repository
# (Artifact Registry fetches it from quay.io and caches it), so the cluster
# needs no registry outside the project.
resource "google_artifact_registry_repository" "upstream" {
  for_each = {
    quay = "https://quay.io"
  }

  # checkov:skip=CKV_GCP_84: A cache of public upstream images (the KubeRay operator), not customer data; Google-managed encryption at rest avoids a KMS key ring whose loss would make the cached images unpullable.
  project       = var.project_id
  location      = var.region
  repository_id = "${var.name_prefix}-${each.key}"
  format        = "DOCKER"
  mode          = "REMOTE_REPOSITORY"
  description   = "Cache of ${each.value} images (the KubeRay operator)."
  labels        = local.labels

  remote_repository_config {
    description = "Public images on ${each.value}."

    docker_repository {
      custom_repository {
        uri = each.value
      }
    }
  }

  depends_on = [google_project_service.this]
}
