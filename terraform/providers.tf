provider "google" {
  project = var.project_id
  region  = var.region
}

# Only for google_project_service_identity (the Pub/Sub service agent).
provider "google-beta" {
  project = var.project_id
  region  = var.region
}

# Helm and kubectl talk to the cluster created in this configuration, with the
# caller's own Google credentials (no static kubeconfig, no client certificate).
data "google_client_config" "current" {}

provider "helm" {
  kubernetes = {
    host                   = "https://${module.gke.endpoint}"
    token                  = data.google_client_config.current.access_token
    cluster_ca_certificate = base64decode(module.gke.ca_certificate)
  }
}

provider "kubectl" {
  host                   = "https://${module.gke.endpoint}"
  token                  = data.google_client_config.current.access_token
  cluster_ca_certificate = base64decode(module.gke.ca_certificate)
  load_config_file       = false
}
