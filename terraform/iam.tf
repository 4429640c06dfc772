/**
 * Service accounts and their grants: least privilege, resource-level where
 * the resource exists, no primitive roles (owner/editor/viewer).
 *
 *   functions       runtime of the Cloud Functions: write (error) results
 *   functions_build Cloud Build for the functions: read source, push images, write build logs
 *   push_invoker    identity of Pub/Sub push requests: run.invoker on the three functions only
 *   serve           Ray pods through workload identity: read images/models, write results,
 *                   read/write the engine cache
 *   gke_nodes       node identity: logs, metrics, pulling the Serve and KubeRay images
 */

locals {
  service_accounts = {
    functions       = "triggerfish functions runtime"
    functions_build = "triggerfish functions build"
    push_invoker    = "triggerfish Pub/Sub push invoker"
    serve           = "triggerfish Ray Serve (workload identity)"
    gke_nodes       = "triggerfish GKE nodes"
  }

  # Project-level roles of the node account: the minimum GKE documents for a
  # custom node service account.
  gke_node_roles = [
    "roles/autoscaling.metricsWriter",
    "roles/logging.logWriter",
    "roles/monitoring.metricWriter",
    "roles/stackdriver.resourceMetadata.writer",
  ]

  # Buckets the Serve account reads images from.
  serve_source_buckets = merge(
    { images = module.storage.bucket_names["images"] },
    { for name in var.extra_source_buckets : "extra:${name}" => name },
  )
}

resource "google_service_account" "this" {
  for_each = local.service_accounts

  project      = var.project_id
  account_id   = "${var.name_prefix}-${replace(each.key, "_", "-")}"
  display_name = each.value
}

# Writing a result overwrites the object at its deterministic path and first
# reads the stored one (shared/result_store.py keeps a newer generation):
# get + create + delete, without list or any bucket permission.
resource "google_project_iam_custom_role" "result_writer" {
  project     = var.project_id
  role_id     = "${replace(var.name_prefix, "-", "_")}_result_writer"
  title       = "triggerfish result writer"
  description = "Read, create and overwrite result objects."
  permissions = [
    "storage.objects.create",
    "storage.objects.delete",
    "storage.objects.get",
  ]
}

# --- functions ---------------------------------------------------------------

resource "google_storage_bucket_iam_member" "functions_results" {
  bucket = module.storage.bucket_names["results"]
  role   = google_project_iam_custom_role.result_writer.id
  member = google_service_account.this["functions"].member
}

# --- functions build -----------------------------------------------------------

resource "google_storage_bucket_iam_member" "functions_build_source_reader" {
  bucket = module.storage.bucket_names["function_source"]
  role   = "roles/storage.objectViewer"
  member = google_service_account.this["functions_build"].member
}

resource "google_artifact_registry_repository_iam_member" "functions_build_writer" {
  project    = var.project_id
  location   = google_artifact_registry_repository.this["functions"].location
  repository = google_artifact_registry_repository.this["functions"].name
  role       = "roles/artifactregistry.writer"
  member     = google_service_account.this["functions_build"].member
}

# Cloud Functions copies the source zip into its own bucket
# (gcf-v2-sources-PROJECT_NUMBER-REGION) and the build reads it from there.
# That bucket is created by the service on the first deployment, so the grant
# is made on the project but conditioned on that single bucket.
resource "google_project_iam_member" "functions_build_gcf_sources_reader" {
  project = var.project_id
  role    = "roles/storage.objectViewer"
  member  = google_service_account.this["functions_build"].member

  condition {
    title       = "gcf-v2-sources bucket only"
    description = "Function sources staged by Cloud Functions for the build."
    expression  = "resource.name.startsWith(\"projects/_/buckets/gcf-v2-sources-${data.google_project.this.number}-${var.region}\")"
  }
}

resource "google_project_iam_member" "functions_build_log_writer" {
  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = google_service_account.this["functions_build"].member
}

# --- serve (workload identity binding is in modules/ray) -----------------------

resource "google_storage_bucket_iam_member" "serve_sources" {
  for_each = local.serve_source_buckets

  bucket = each.value
  role   = "roles/storage.objectViewer"
  member = google_service_account.this["serve"].member
}

resource "google_storage_bucket_iam_member" "serve_models" {
  bucket = module.storage.bucket_names["models"]
  role   = "roles/storage.objectViewer"
  member = google_service_account.this["serve"].member
}

resource "google_storage_bucket_iam_member" "serve_results" {
  bucket = module.storage.bucket_names["results"]
  role   = google_project_iam_custom_role.result_writer.id
  member = google_service_account.this["serve"].member
}

resource "google_storage_bucket_iam_member" "serve_engine_cache" {
  bucket = module.storage.bucket_names["engine_cache"]
  role   = "roles/storage.objectUser"
  member = google_service_account.this["serve"].member
}

# --- GKE nodes -------------------------------------------------------------------

resource "google_project_iam_member" "gke_nodes" {
  for_each = toset(local.gke_node_roles)

  project = var.project_id
  role    = each.value
  member  = google_service_account.this["gke_nodes"].member
}

# The nodes pull the Serve image and the cached KubeRay operator image.
resource "google_artifact_registry_repository_iam_member" "gke_nodes_reader" {
  for_each = {
    serve = google_artifact_registry_repository.this["serve"]
    quay  = google_artifact_registry_repository.upstream["quay"]
  }

  project    = var.project_id
  location   = each.value.location
  repository = each.value.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.this["gke_nodes"].member
}
