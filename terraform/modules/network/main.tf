/**
 * VPC for GKE and the functions: a node subnet with secondary ranges for
 * pods and services, a Serverless VPC Access connector so the functions can
 * reach the internal load balancer in front of Ray Serve, Cloud NAT for the
 * private nodes, and a reserved internal address for that load balancer (so
 * the Serve endpoint is known before the cluster exists and can be passed to
 * the functions).
 */

resource "google_compute_network" "this" {
  project                 = var.project_id
  name                    = "${var.name}-vpc"
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"
}

resource "google_compute_subnetwork" "nodes" {
  project                    = var.project_id
  name                       = "${var.name}-nodes"
  region                     = var.region
  network                    = google_compute_network.this.id
  ip_cidr_range              = var.ip_ranges.nodes
  private_ip_google_access   = true
  private_ipv6_google_access = "ENABLE_OUTBOUND_VM_ACCESS_TO_GOOGLE"

  secondary_ip_range {
    range_name    = "${var.name}-pods"
    ip_cidr_range = var.ip_ranges.pods
  }

  secondary_ip_range {
    range_name    = "${var.name}-services"
    ip_cidr_range = var.ip_ranges.services
  }

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_subnetwork" "connector" {
  project                    = var.project_id
  name                       = "${var.name}-connector"
  region                     = var.region
  network                    = google_compute_network.this.id
  ip_cidr_range              = var.ip_ranges.connector
  private_ip_google_access   = true
  private_ipv6_google_access = "ENABLE_OUTBOUND_VM_ACCESS_TO_GOOGLE"

  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_vpc_access_connector" "this" {
  project       = var.project_id
  name          = "${var.name}-conn"
  region        = var.region
  machine_type  = var.connector_machine_type
  min_instances = var.connector_instances.min
  max_instances = var.connector_instances.max

  subnet {
    name = google_compute_subnetwork.connector.name
  }
}

# Private nodes have no external address. Images and Google APIs are reached
# through Private Google Access; NAT covers anything else the pods fetch.
resource "google_compute_router" "this" {
  project = var.project_id
  name    = "${var.name}-router"
  region  = var.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  project                            = var.project_id
  name                               = "${var.name}-nat"
  router                             = google_compute_router.this.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.nodes.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

# The internal load balancer gets its own firewall rules from GKE (from the
# Service's loadBalancerSourceRanges, the connector range); this rule states
# the one flow the system depends on (functions -> Serve) explicitly, limited
# to the connector range and the Serve port. The Ray pods' NetworkPolicy
# admits the same range only.
resource "google_compute_firewall" "serve_from_connector" {
  project     = var.project_id
  name        = "${var.name}-allow-serve-from-functions"
  network     = google_compute_network.this.id
  direction   = "INGRESS"
  priority    = 1000
  description = "Cloud Functions (through the VPC connector) to Ray Serve on the GKE nodes."

  source_ranges = [var.ip_ranges.connector]
  target_tags   = [var.node_network_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.serve_port)]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_address" "serve" {
  project      = var.project_id
  name         = "${var.name}-serve-ilb"
  region       = var.region
  subnetwork   = google_compute_subnetwork.nodes.id
  address_type = "INTERNAL"
  description  = "Internal load balancer address of the Ray Serve service."
}
