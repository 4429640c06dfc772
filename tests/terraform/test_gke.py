"""GKE: private, workload identity, hardened nodes, a GPU pool that scales from zero."""

from __future__ import annotations

from tests.terraform._hcl import block, child, root


def _gke():
    return child("gke")


def test_cluster_is_private_with_workload_identity_and_network_policy():
    cluster = _gke().resource("google_container_cluster", "this")
    assert (
        block(cluster, "workload_identity_config")["workload_pool"]
        == "${var.project_id}.svc.id.goog"
    )
    private = block(cluster, "private_cluster_config")
    assert private["enable_private_nodes"] is True
    assert block(cluster, "network_policy")["enabled"] is True
    assert block(block(cluster, "addons_config"), "network_policy_config")["disabled"] is False
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


def test_rayservice_manifest_is_applied_from_infra_k8s():
    ray = child("ray")
    assert (
        ray.locals["rayservice_yaml"]
        == '${templatefile("${var.manifests_dir}/rayservice.yaml", local.template_vars)}'
    )
    assert ray.resource("kubectl_manifest", "rayservice")["yaml_body"] == "${local.rayservice_yaml}"
    assert root().module_calls["ray"]["manifests_dir"] == "${path.module}/../infra/k8s"
    for name in ("namespace", "service_account", "network_policy"):
        assert "${var.manifests_dir}/" in ray.resource("kubectl_manifest", name)["yaml_body"]


def test_workload_identity_binds_the_ray_service_account():
    binding = child("ray").resource("google_service_account_iam_member", "workload_identity")
    assert binding["role"] == "roles/iam.workloadIdentityUser"
    assert binding["member"] == (
        "serviceAccount:${var.project_id}.svc.id.goog[${var.namespace}/${var.service_account_name}]"
    )
