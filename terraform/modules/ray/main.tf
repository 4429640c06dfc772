/**
 * KubeRay operator (Helm) and the RayService running the Serve application.
 *
 * The manifests live in infra/k8s as the source of truth and are applied with
 * kubectl_manifest: unlike kubernetes_manifest it needs neither a reachable
 * cluster nor the RayService CRD at plan time, so one `terraform apply`
 * creates the cluster, installs the operator and deploys the service.
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
    gpus_per_worker         = var.gpus_per_worker
    gpu_worker_max_replicas = var.gpu_worker_max_replicas
    model_max_replicas      = var.gpu_worker_max_replicas * var.gpus_per_worker
    serve_ip                = var.serve_ip
    connector_cidr          = var.connector_cidr
    nodes_cidr              = var.nodes_cidr
    models_bucket           = var.serve_environment.models_bucket
    engine_cache_bucket     = var.serve_environment.engine_cache_bucket
    results_bucket          = var.serve_environment.results_bucket
    allowed_buckets         = join(",", var.serve_environment.allowed_buckets)
    default_model           = var.serve_environment.default_model
  }

  rayservice_yaml = templatefile("${var.manifests_dir}/rayservice.yaml", local.template_vars)
  rayservice      = yamldecode(local.rayservice_yaml)
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
}

resource "kubectl_manifest" "namespace" {
  yaml_body = templatefile("${var.manifests_dir}/namespace.yaml", local.template_vars)
}

resource "kubectl_manifest" "service_account" {
  yaml_body = templatefile("${var.manifests_dir}/serviceaccount.yaml", local.template_vars)

  depends_on = [kubectl_manifest.namespace]
}

resource "kubectl_manifest" "network_policy" {
  yaml_body = templatefile("${var.manifests_dir}/networkpolicy.yaml", local.template_vars)

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
  yaml_body = local.rayservice_yaml

  depends_on = [
    helm_release.kuberay_operator,
    kubectl_manifest.service_account,
    kubectl_manifest.network_policy,
    google_service_account_iam_member.workload_identity,
  ]
}
