/**
 * A private, VPC-native GKE cluster with workload identity, plus two node
 * pools: CPU (Ray head, Ingress workers, the KubeRay operator) and GPU (model
 * replicas; autoscaled from zero and tainted so only GPU work lands there).
 */

locals {
  oauth_scopes = ["https://www.googleapis.com/auth/cloud-platform"]
}

resource "google_container_cluster" "this" {
  # checkov:skip=CKV_GCP_65: RBAC through Google Groups requires a Google Workspace domain (gke-security-groups@DOMAIN) that this project cannot assume; access is granted with IAM roles instead.
  project  = var.project_id
  name     = var.name
  location = var.location

  network         = var.network
  subnetwork      = var.subnetwork
  networking_mode = "VPC_NATIVE"

  # Node pools are managed separately (google_container_node_pool) so they can
  # change without recreating the cluster.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection
  resource_labels          = var.labels

  release_channel {
    channel = var.release_channel
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  ip_allocation_policy {
    cluster_secondary_range_name  = var.pods_range_name
    services_secondary_range_name = var.services_range_name
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.master_ipv4_cidr_block
  }

  master_authorized_networks_config {
    gcp_public_cidrs_access_enabled = false

    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks

      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  # GKE Dataplane V2 (eBPF) enforces NetworkPolicy itself; the Calico add-on
  # must stay off with it (network_policy disabled, no network_policy_config).
  datapath_provider = "ADVANCED_DATAPATH"

  # GKE subsetting for L4 internal load balancers: the Serve Service names its
  # reserved address with networking.gke.io/load-balancer-ip-addresses, which
  # only the subsetting controller honours (the legacy controller reads the
  # deprecated spec.loadBalancerIP and would pick an ephemeral address instead,
  # while the functions are wired to the reserved one). It also gives the load
  # balancer GCE_VM_IP NEG backends of the nodes that run serving pods, which
  # suits externalTrafficPolicy Local. Subsetting cannot be turned off again
  # on a cluster; from GKE 1.36 it is on for every cluster anyway.
  enable_l4_ilb_subsetting = true

  network_policy {
    enabled = false
  }

  addons_config {
    http_load_balancing {
      disabled = false
    }
  }

  # Managed Service for Prometheus collects what PodMonitoring resources
  # select (the Ray pods' metrics port, modules/monitoring).
  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]

    managed_prometheus {
      enabled = true
    }
  }

  # The project's policy (terraform/binauthz.tf) admits only the project's
  # Artifact Registry images and GKE's own system images.
  binary_authorization {
    evaluation_mode = "PROJECT_SINGLETON_POLICY_ENFORCE"
  }

  enable_shielded_nodes       = true
  enable_intranode_visibility = true
  enable_legacy_abac          = false
  logging_service             = "logging.googleapis.com/kubernetes"
  monitoring_service          = "monitoring.googleapis.com/kubernetes"

  # Settings of the temporary default pool (removed right after creation);
  # hardened like the real pools so no insecure node ever runs.
  node_config {
    service_account = var.node_service_account_email
    oauth_scopes    = local.oauth_scopes
    image_type      = "COS_CONTAINERD"

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  lifecycle {
    # The default pool no longer exists; its node_config must not force a
    # cluster replacement when defaults change.
    ignore_changes = [node_config]
  }
}

resource "google_container_node_pool" "cpu" {
  project  = var.project_id
  name     = "cpu"
  cluster  = google_container_cluster.this.id
  location = var.location

  initial_node_count = var.cpu_pool.min_node_count

  autoscaling {
    min_node_count = var.cpu_pool.min_node_count
    max_node_count = var.cpu_pool.max_node_count
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type    = var.cpu_pool.machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.cpu_pool.disk_size_gb
    service_account = var.node_service_account_email
    oauth_scopes    = local.oauth_scopes
    tags            = [var.node_network_tag]
    resource_labels = var.labels

    labels = {
      "triggerfish/pool" = "cpu"
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    # Image streaming: containers start while the image is still being read
    # from Artifact Registry, so the multi-GB Serve image does not have to be
    # pulled whole before a new node's Ray worker starts.
    gcfs_config {
      enabled = true
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}

resource "google_container_node_pool" "gpu" {
  project        = var.project_id
  name           = "gpu"
  cluster        = google_container_cluster.this.id
  location       = var.location
  node_locations = var.gpu_pool.node_locations

  initial_node_count = 0

  # Scale to zero when no model replica needs a GPU; the Ray autoscaler asks
  # for GPU worker pods and the cluster autoscaler adds nodes for them.
  autoscaling {
    min_node_count  = 0
    max_node_count  = var.gpu_pool.max_node_count
    location_policy = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  upgrade_settings {
    max_surge       = 1
    max_unavailable = 0
  }

  node_config {
    machine_type    = var.gpu_pool.machine_type
    image_type      = "COS_CONTAINERD"
    disk_type       = "pd-balanced"
    disk_size_gb    = var.gpu_pool.disk_size_gb
    spot            = var.gpu_pool.spot
    service_account = var.node_service_account_email
    oauth_scopes    = local.oauth_scopes
    tags            = [var.node_network_tag]
    resource_labels = var.labels

    labels = {
      "triggerfish/pool" = "gpu"
    }

    metadata = {
      disable-legacy-endpoints = "true"
    }

    guest_accelerator {
      type  = var.gpu_pool.accelerator_type
      count = var.gpu_pool.accelerator_count

      # GKE installs the NVIDIA driver itself; no driver DaemonSet to manage.
      gpu_driver_installation_config {
        gpu_driver_version = var.gpu_pool.gpu_driver_version
      }
    }

    # Only pods that tolerate this taint (the Ray GPU worker group) are
    # scheduled on GPU nodes.
    taint {
      key    = "nvidia.com/gpu"
      value  = "present"
      effect = "NO_SCHEDULE"
    }

    workload_metadata_config {
      mode = "GKE_METADATA"
    }

    # Image streaming: containers start while the image is still being read
    # from Artifact Registry, so the multi-GB Serve image does not have to be
    # pulled whole before a new node's Ray worker starts.
    gcfs_config {
      enabled = true
    }

    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }
}
