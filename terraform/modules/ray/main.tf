/**
 * KubeRay operator (Helm), the RayService running the Serve application, and
 * the Memorystore for Redis instance that makes the Ray head fault tolerant.
 *
 * The manifests live in infra/k8s as the source of truth; modules/ray-manifests
 * renders them and they are applied with kubectl_manifest, which needs neither
 * a reachable cluster nor the RayService CRD at plan time, so one
 * `terraform apply` creates the cluster, installs the operator and deploys
 * the service.
 *
 * Teardown order (the reverse of the dependencies below), so that
 * `terraform destroy` finishes although GKE created a load balancer and
 * firewall rules for the Serve service that Terraform does not know about:
 *
 *   1. the RayService is deleted in the foreground and Terraform waits
 *      (wait = true) until its RayCluster (whose Redis clean-up finalizer the
 *      operator runs) and its Serve service are gone; the Service's
 *      load-balancer finalizer is only removed once GKE has deleted the
 *      forwarding rule, backend service, health check and firewall rules;
 *   2. the namespace is deleted and Terraform waits until everything in it is
 *      gone, while the operator is still running;
 *   3. the operator, then Redis, then (in the root module) the cluster, the
 *      reserved address and the network.
 */

locals {
  template_vars = {
    namespace               = var.namespace
    service_account_name    = var.service_account_name
    serve_gsa_email         = var.serve_gsa_email
    kuberay_namespace       = var.kuberay_namespace
    image                   = var.image
    ray_version             = var.ray_version
    project_id              = var.project_id
    cpu_node_pool           = var.cpu_node_pool
    gpu_node_pool           = var.gpu_node_pool
    gpus_per_worker         = tostring(var.gpus_per_worker)
    gpu_worker_max_replicas = tostring(var.gpu_worker_max_replicas)
    model_max_replicas      = tostring(var.gpu_worker_max_replicas * var.gpus_per_worker)
    serve_address_name      = var.serve_address_name
    connector_cidr          = var.connector_cidr
    models_bucket           = var.serve_environment.models_bucket
    engine_cache_bucket     = var.serve_environment.engine_cache_bucket
    results_bucket          = var.serve_environment.results_bucket
    allowed_buckets         = join(",", var.serve_environment.allowed_buckets)
    default_model           = var.serve_environment.default_model
    serve_audience          = var.serve_environment.serve_audience
    allowed_invokers        = join(",", var.serve_environment.allowed_invokers)
    request_timeout_s       = tostring(var.serve_environment.request_timeout_s)
    redis_host              = google_redis_instance.gcs.host
    redis_port              = tostring(google_redis_instance.gcs.port)
    # Every CA certificate Memorystore lists: during a CA rotation the server
    # may present a certificate from the new CA while the old one is still
    # listed, so trusting only the first would fail a head restart then.
    redis_ca_base64 = base64encode(join("\n", [for ca in google_redis_instance.gcs.server_ca_certs : trimspace(ca.cert)]))
  }
}

module "manifests" {
  source = "../ray-manifests"

  manifests_dir     = var.manifests_dir
  models            = var.serve_environment.models
  model_autoscaling = var.model_autoscaling
  template_vars     = local.template_vars
  secret_vars       = { redis_auth_base64 = base64encode(google_redis_instance.gcs.auth_string) }
}

# GCS fault tolerance: the Ray head stores the cluster state here, so a
# restarted head recovers it instead of taking every worker (and every Serve
# replica) down with it. Private to the VPC, AUTH and TLS required.
resource "google_redis_instance" "gcs" {
  project                 = var.project_id
  region                  = var.region
  name                    = "${var.name}-ray-gcs"
  display_name            = "Ray GCS fault tolerance (${var.name})"
  tier                    = var.gcs_redis.tier
  memory_size_gb          = var.gcs_redis.memory_size_gb
  redis_version           = var.gcs_redis.redis_version
  authorized_network      = var.network_id
  connect_mode            = "DIRECT_PEERING"
  reserved_ip_range       = var.gcs_redis.reserved_ip_range
  auth_enabled            = true
  transit_encryption_mode = "SERVER_AUTHENTICATION"
  labels                  = var.labels

  persistence_config {
    persistence_mode    = "RDB"
    rdb_snapshot_period = "ONE_HOUR"
  }
}

resource "helm_release" "kuberay_operator" {
  name             = "kuberay-operator"
  repository       = "https://ray-project.github.io/kuberay-helm/"
  chart            = "kuberay-operator"
  version          = var.kuberay_chart_version
  namespace        = var.kuberay_namespace
  create_namespace = true
  atomic           = true
  wait             = true

  # The operator image comes through the project's Artifact Registry (a remote
  # repository in front of quay.io), the only registry Binary Authorization
  # admits besides GKE's own.
  values = [yamlencode({
    image = {
      repository = "${var.kuberay_image_repository}/kuberay/operator"
      tag        = "v${var.kuberay_chart_version}"
    }
  })]
}

# Deleted after everything in it (wait = true waits for the namespace to be
# gone, which includes the Serve service's load balancer clean-up) and before
# the operator, which must still run the RayCluster's Redis clean-up.
resource "kubectl_manifest" "namespace" {
  yaml_body = module.manifests.documents["namespace"]
  wait      = true

  depends_on = [helm_release.kuberay_operator]
}

resource "kubectl_manifest" "namespaced" {
  for_each = toset(["serviceaccount", "networkpolicy", "poddisruptionbudget", "redis-ca"])

  yaml_body = module.manifests.documents[each.key]

  depends_on = [kubectl_manifest.namespace]
}

resource "kubectl_manifest" "redis_secret" {
  yaml_body        = module.manifests.secret_documents["redis-secret"]
  sensitive_fields = ["data"]

  depends_on = [kubectl_manifest.namespace]
}

# Workload identity: the Kubernetes service account may act as the Serve
# Google service account (and nothing else may).
resource "google_service_account_iam_member" "workload_identity" {
  service_account_id = "projects/${var.project_id}/serviceAccounts/${var.serve_gsa_email}"
  role               = "roles/iam.workloadIdentityUser"
  member             = "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/${var.service_account_name}]"
}

resource "kubectl_manifest" "rayservice" {
  yaml_body = module.manifests.rayservice

  # Foreground deletion: destroy returns only when the RayCluster and the
  # Serve service (with its load balancer) are gone.
  wait           = true
  delete_cascade = "Foreground"

  lifecycle {
    precondition {
      condition     = can(regex("@sha256:[0-9a-f]{64}$", var.image))
      error_message = "The Serve image must be referenced by digest (REPOSITORY@sha256:...), got ${var.image}: build and push it, then set serve_image_digest (see terraform/README.md)."
    }
  }

  depends_on = [
    helm_release.kuberay_operator,
    kubectl_manifest.namespaced,
    kubectl_manifest.redis_secret,
    google_service_account_iam_member.workload_identity,
  ]
}
