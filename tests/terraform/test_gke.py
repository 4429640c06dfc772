"""GKE: private, workload identity, hardened nodes, a GPU pool that scales from zero."""

from __future__ import annotations

import yaml

from tests.terraform._hcl import K8S_DIR, block, child, root


def _gke():
    return child("gke")


def test_cluster_is_private_with_workload_identity_and_dataplane_v2():
    cluster = _gke().resource("google_container_cluster", "this")
    assert (
        block(cluster, "workload_identity_config")["workload_pool"]
        == "${var.project_id}.svc.id.goog"
    )
    private = block(cluster, "private_cluster_config")
    assert private["enable_private_nodes"] is True
    # Dataplane V2 enforces NetworkPolicy; the Calico add-on must not be configured with it.
    assert cluster["datapath_provider"] == "ADVANCED_DATAPATH"
    assert block(cluster, "network_policy") == {"enabled": False}
    assert "network_policy_config" not in block(cluster, "addons_config")
    assert cluster["enable_shielded_nodes"] is True
    assert cluster["enable_legacy_abac"] is False
    assert cluster["remove_default_node_pool"] is True
    assert block(cluster, "master_authorized_networks_config")["dynamic"]
    assert (
        block(block(cluster, "master_auth"), "client_certificate_config")[
            "issue_client_certificate"
        ]
        is False
    )
    authorized = _gke().variables["master_authorized_networks"]
    assert "0.0.0.0/0" in authorized["validation"][0]["condition"]


def test_gpu_pool_has_accelerators_a_taint_and_scales_from_zero():
    pool = _gke().resource("google_container_node_pool", "gpu")
    assert block(pool, "autoscaling")["min_node_count"] == 0
    assert pool["initial_node_count"] == 0
    node = block(pool, "node_config")
    accelerator = block(node, "guest_accelerator")
    assert accelerator["type"] == "${var.gpu_pool.accelerator_type}"
    assert accelerator["count"] == "${var.gpu_pool.accelerator_count}"
    driver = block(accelerator, "gpu_driver_installation_config")
    assert driver["gpu_driver_version"] == "${var.gpu_pool.gpu_driver_version}"
    assert block(node, "taint") == {
        "key": "nvidia.com/gpu",
        "value": "present",
        "effect": "NO_SCHEDULE",
    }


def test_accelerator_type_and_count_are_variables_with_sensible_defaults():
    for module in (_gke(), root()):
        default = module.variables["gpu_pool"]["default"]
        assert default["accelerator_type"] == "nvidia-l4"
        assert default["accelerator_count"] == 1
        assert default["max_node_count"] >= 1
    assert root().module_calls["gke"]["gpu_pool"] == "${var.gpu_pool}"


def test_cpu_pool_hosts_the_ray_head():
    pool = _gke().resource("google_container_node_pool", "cpu")
    node = block(pool, "node_config")
    assert "taint" not in node
    assert "guest_accelerator" not in node


def test_binary_authorization_admits_only_the_projects_images():
    cluster = _gke().resource("google_container_cluster", "this")
    assert (
        block(cluster, "binary_authorization")["evaluation_mode"]
        == "PROJECT_SINGLETON_POLICY_ENFORCE"
    )
    top = root()
    assert "binaryauthorization.googleapis.com" in top.locals["apis"]
    policy = top.resource("google_binary_authorization_policy", "this")
    rule = block(policy, "default_admission_rule")
    assert rule["evaluation_mode"] == "ALWAYS_DENY"
    assert rule["enforcement_mode"] == "ENFORCED_BLOCK_AND_AUDIT_LOG"
    # GKE's own system images stay admitted through Google's global policy.
    assert policy["global_policy_evaluation_mode"] == "ENABLE"
    patterns = top.locals["admitted_image_patterns"]
    assert len(patterns) == 2
    assert all(p.startswith("${local.registry_host}/${var.project_id}/") for p in patterns)
    assert any('this["serve"]' in p and p.endswith("/**") for p in patterns)
    assert any('upstream["quay"]' in p and p.endswith("/kuberay/**") for p in patterns)
    assert "google_binary_authorization_policy.this" in " ".join(
        top.module_calls["ray"]["depends_on"]
    )


def test_kuberay_operator_image_comes_through_the_projects_registry():
    top = root()
    remote = top.resource("google_artifact_registry_repository", "upstream")
    assert remote["mode"] == "REMOTE_REPOSITORY"
    assert remote["for_each"] == {"quay": "https://quay.io"}
    assert top.module_calls["ray"]["kuberay_image_repository"].endswith(
        '${google_artifact_registry_repository.upstream["quay"].repository_id}'
    )
    values = child("ray").resource("helm_release", "kuberay_operator")["values"]
    assert "${var.kuberay_image_repository}/kuberay/operator" in str(values)
    reader = top.resource("google_artifact_registry_repository_iam_member", "gke_nodes_reader")
    assert set(reader["for_each"]) == {"serve", "quay"}


def test_nodes_stream_images_and_managed_prometheus_collects_metrics():
    for name in ("cpu", "gpu"):
        node = block(_gke().resource("google_container_node_pool", name), "node_config")
        assert block(node, "gcfs_config") == {"enabled": True}, name
    assert "containerfilesystem.googleapis.com" in root().locals["apis"]
    monitoring = block(_gke().resource("google_container_cluster", "this"), "monitoring_config")
    assert block(monitoring, "managed_prometheus") == {"enabled": True}


def test_every_node_pool_is_hardened_and_managed():
    for name in ("cpu", "gpu"):
        pool = _gke().resource("google_container_node_pool", name)
        node = block(pool, "node_config")
        assert node["image_type"] == "COS_CONTAINERD", name
        assert block(node, "workload_metadata_config")["mode"] == "GKE_METADATA", name
        shielded = block(node, "shielded_instance_config")
        assert shielded == {"enable_secure_boot": True, "enable_integrity_monitoring": True}, name
        assert node["service_account"] == "${var.node_service_account_email}", name
        assert node["metadata"] == {"disable-legacy-endpoints": "true"}, name
        assert block(pool, "management") == {"auto_repair": True, "auto_upgrade": True}, name


def test_kuberay_operator_is_a_pinned_helm_release():
    release = child("ray").resource("helm_release", "kuberay_operator")
    assert release["chart"] == "kuberay-operator"
    assert release["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert release["version"] == "${var.kuberay_chart_version}"
    default = root().variables["kuberay_chart_version"]["default"]
    assert default.count(".") == 2 and all(part.isdigit() for part in default.split("."))
    # 1.7.0 is the first KubeRay release whose RayService samples run Serve's HAProxy data
    # plane (RAY_SERVE_ENABLE_HA_PROXY), which infra/k8s/rayservice.yaml turns on.
    assert tuple(int(part) for part in default.split(".")) >= (1, 7, 0)


def test_manifests_are_rendered_from_infra_k8s_and_applied():
    ray = child("ray")
    call = ray.module_calls["manifests"]
    assert call["source"] == "../ray-manifests"
    assert call["manifests_dir"] == "${var.manifests_dir}"
    assert call["models"] == "${var.serve_environment.models}"
    assert root().module_calls["ray"]["manifests_dir"] == "${path.module}/../infra/k8s"
    assert (
        ray.resource("kubectl_manifest", "rayservice")["yaml_body"]
        == "${module.manifests.rayservice}"
    )
    assert ray.resource("kubectl_manifest", "namespace")["yaml_body"] == (
        '${module.manifests.documents["namespace"]}'
    )
    assert ray.resource("kubectl_manifest", "namespaced")["yaml_body"] == (
        "${module.manifests.documents[each.key]}"
    )
    assert ray.resource("kubectl_manifest", "redis_secret")["yaml_body"] == (
        '${module.manifests.secret_documents["redis-secret"]}'
    )


def test_destroy_waits_for_the_load_balancer_gke_created():
    """GKE's load balancer and firewall rules for the Serve service hold the reserved address
    and the network: destroy must wait for them to be gone before removing those."""
    ray = child("ray")
    rayservice = ray.resource("kubectl_manifest", "rayservice")
    assert rayservice["wait"] is True
    assert rayservice["delete_cascade"] == "Foreground"
    namespace = ray.resource("kubectl_manifest", "namespace")
    assert namespace["wait"] is True
    # The namespace (and with it the RayCluster's Redis clean-up) goes before the operator.
    assert namespace["depends_on"] == ["${helm_release.kuberay_operator}"]
    assert "${helm_release.kuberay_operator}" in rayservice["depends_on"]
    top = root()
    assert "${module.gke}" in top.module_calls["ray"]["depends_on"]
    assert top.module_calls["ray"]["serve_address_name"] == "${module.network.serve_address_name}"
    assert top.module_calls["monitoring"]["depends_on"] == ["${module.ray}"]


def test_workload_identity_binds_the_ray_service_account():
    binding = child("ray").resource("google_service_account_iam_member", "workload_identity")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"] == (
        "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/${var.service_account_name}]"
    )


def test_the_cluster_honours_the_serve_services_address_annotation():
    """The Serve Service names its reserved address with the annotation that GKE's subsetting
    L4 controller reads; without subsetting the legacy controller ignores it and the load
    balancer gets an ephemeral address the functions do not call."""
    cluster = _gke().resource("google_container_cluster", "this")
    assert cluster["enable_l4_ilb_subsetting"] is True
    manifest = yaml.safe_load((K8S_DIR / "rayservice.yaml").read_text())
    service = manifest["spec"]["serveService"]
    annotations = service["metadata"]["annotations"]
    assert annotations["networking.gke.io/load-balancer-ip-addresses"] == "${serve_address_name}"
    assert annotations["networking.gke.io/load-balancer-type"] == "Internal"
    assert "loadBalancerIP" not in service["spec"]
