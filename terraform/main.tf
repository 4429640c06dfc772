/**
 * triggerfish on Google Cloud: Pub/Sub, Cloud Storage, Cloud Functions
 * (gen2) and Ray Serve on GKE.
 *
 * Names and delivery settings come from infra/footprint.json, the file the
 * local emulator stack reads as well, so the two cannot drift: topic and
 * subscription names are used as they are; bucket names, which are global,
 * get the project id as a prefix (PROJECT-triggerfish-images, ...).
 */

locals {
  footprint = jsondecode(file("${path.module}/../infra/footprint.json"))

  # Globally unique bucket names: "<project id>-<footprint name>".
  bucket_names = { for key, name in local.footprint.buckets : key => "${var.project_id}-${name}" }

  # Subscriptions that feed a function (they name an entry point); the pull
  # subscriptions of readers (the results events); the dead-letter sink.
  function_subscriptions = {
    for key, sub in local.footprint.subscriptions : key => sub if lookup(sub, "entry_point", null) != null
  }
  pull_subscriptions = {
    for key, sub in local.footprint.subscriptions : key => sub
    if lookup(sub, "entry_point", null) == null && key != "dead_letter"
  }

  labels = merge(var.labels, { managed-by = "terraform" })

  function_source_archive = var.function_source_archive != "" ? var.function_source_archive : "${path.module}/../build/functions-source.zip"
  allowed_buckets         = concat([local.bucket_names.images], var.extra_source_buckets)

  # How the functions run comes from the footprint as well, so the local stack's
  # functions-framework processes run with the same threads and timeouts
  # (infra.footprint.FunctionSettings.environment() gives the same THREADS,
  # WORKERS and TRIGGERFISH_REQUEST_TIMEOUT_S there; a test compares them).
  # THREADS is the request concurrency: functions-framework's gunicorn runs
  # THREADS (default 4 x CPUs) threads, and Cloud Run would queue every event
  # beyond them inside the instance. Timeouts nest: ack deadline > function
  # timeout (ack deadline - timeout_margin_seconds, so a slow call ends as a
  # handled failure, never as a cut-off push) > serve_wait_seconds (how long a
  # function waits for Serve) > Serve's own request timeout.
  function_settings       = local.footprint.functions
  serve_request_timeout_s = local.footprint.serve.request_timeout_seconds

  # Serve listens on plain HTTP inside the VPC; every request carries a Google
  # ID token for this audience, and the ingress accepts only the listed
  # service accounts (see terraform/README.md, "Serve endpoint").
  serve_port       = 8000
  serve_endpoint   = "http://${module.network.serve_address}:${local.serve_port}"
  serve_audience   = local.serve_endpoint
  allowed_invokers = concat([google_service_account.this["functions"].email], var.extra_serve_invokers)

  # One place for Ray's version: requirements/RAY_VERSION, which the image's
  # lock file (requirements/serve-gpu.lock) pins as well.
  ray_version = trimspace(file("${path.module}/../requirements/RAY_VERSION"))

  registry_host          = "${var.region}-docker.pkg.dev"
  serve_image_repository = var.serve_image_repository != "" ? var.serve_image_repository : "${local.registry_host}/${var.project_id}/${google_artifact_registry_repository.this["serve"].repository_id}/serve-gpu"
  serve_image            = "${local.serve_image_repository}@${var.serve_image_digest}"

  apis = [
    "artifactregistry.googleapis.com",
    "binaryauthorization.googleapis.com",
    "cloudbuild.googleapis.com",
    "cloudfunctions.googleapis.com",
    "compute.googleapis.com",
    "container.googleapis.com",
    "containerfilesystem.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
    "pubsub.googleapis.com",
    "redis.googleapis.com",
    "run.googleapis.com",
    "storage.googleapis.com",
    "vpcaccess.googleapis.com",
  ]
  # Only with the optional table of result events.
  bigquery_apis = var.results_bigquery.enabled ? ["bigquery.googleapis.com"] : []
}

resource "google_project_service" "this" {
  for_each = var.activate_apis ? toset(concat(local.apis, local.bigquery_apis)) : toset([])

  project            = var.project_id
  service            = each.value
  disable_on_destroy = false
}

data "google_project" "this" {
  project_id = var.project_id
}

# Service agents: Pub/Sub forwards dead letters and signs push requests;
# Cloud Storage publishes bucket notifications. Both are created on request
# (the identity resource and the data source call the services' "get or
# create" methods) instead of being assumed to exist, which on a new project
# they often do not right after the API is enabled.
data "google_storage_project_service_account" "gcs" {
  project = var.project_id

  depends_on = [google_project_service.this]
}

resource "google_project_service_identity" "pubsub" {
  provider = google-beta

  project = var.project_id
  service = "pubsub.googleapis.com"

  depends_on = [google_project_service.this]
}

# A newly created service agent takes a while to become visible to IAM; a
# grant made at once can fail with "service account ... does not exist".
resource "time_sleep" "pubsub_service_agent" {
  create_duration = "60s"

  triggers = {
    email = google_project_service_identity.pubsub.email
  }
}

locals {
  pubsub_service_agent = time_sleep.pubsub_service_agent.triggers["email"]
}

module "network" {
  source = "./modules/network"

  project_id       = var.project_id
  region           = var.region
  name             = var.name_prefix
  ip_ranges        = var.ip_ranges
  node_network_tag = "${var.name_prefix}-gke-node"
  serve_port       = local.serve_port

  depends_on = [google_project_service.this]
}

module "pubsub" {
  source = "./modules/pubsub"

  project_id = var.project_id
  labels     = local.labels

  topics = {
    for key, name in local.footprint.topics : key => { name = name } if key != "dead_letter"
  }
  dead_letter_topic = { name = local.footprint.topics.dead_letter }

  push_subscriptions = {
    for key, sub in local.function_subscriptions : key => {
      name  = sub.name
      topic = sub.topic
      # The topic path in the URL lets functions-framework fill in the
      # CloudEvent source (//pubsub.googleapis.com/projects/P/topics/T).
      push_endpoint         = "${module.functions.uris[key]}/projects/${var.project_id}/topics/${local.footprint.topics[sub.topic]}"
      audience              = module.functions.uris[key]
      ack_deadline_seconds  = sub.ack_deadline_seconds
      min_backoff_seconds   = sub.min_backoff_seconds
      max_backoff_seconds   = sub.max_backoff_seconds
      max_delivery_attempts = sub.max_delivery_attempts
    }
  }

  # `triggerfish results` reads the results events here (no expiry; a reader
  # started late catches up within the retention).
  pull_subscriptions = {
    for key, sub in local.pull_subscriptions : key => {
      name                      = sub.name
      topic                     = sub.topic
      ack_deadline_seconds      = sub.ack_deadline_seconds
      message_retention_seconds = sub.message_retention_seconds
    }
  }

  # Optional: every result event as a row of BigQuery (var.results_bigquery).
  bigquery_subscriptions = var.results_bigquery.enabled ? {
    results_bigquery = {
      name  = "${local.footprint.topics.results}-bigquery"
      topic = "results"
      table = module.results_bigquery[0].table_id
    }
  } : {}

  dead_letter_subscription = {
    name                      = local.footprint.subscriptions.dead_letter.name
    ack_deadline_seconds      = local.footprint.subscriptions.dead_letter.ack_deadline_seconds
    message_retention_seconds = local.footprint.subscriptions.dead_letter.message_retention_seconds
  }

  push_invoker_service_account_email = google_service_account.this["push_invoker"].email
  pubsub_service_agent_email         = local.pubsub_service_agent

  depends_on = [google_project_service.this]
}

module "results_bigquery" {
  source = "./modules/results-bigquery"
  count  = var.results_bigquery.enabled ? 1 : 0

  project_id                   = var.project_id
  dataset_id                   = var.results_bigquery.dataset
  table_id                     = var.results_bigquery.table
  location                     = var.results_bigquery.location != "" ? var.results_bigquery.location : var.region
  schema                       = file("${path.module}/schemas/result_events.json")
  partition_expiration_days    = var.results_bigquery.partition_expiration_days
  deletion_protection          = var.results_bigquery.deletion_protection
  writer_service_account_email = local.pubsub_service_agent
  labels                       = local.labels

  depends_on = [google_project_service.this]
}

module "storage" {
  source = "./modules/storage"

  project_id              = var.project_id
  location                = var.bucket_location != "" ? var.bucket_location : var.region
  labels                  = local.labels
  gcs_service_agent_email = data.google_storage_project_service_account.gcs.email_address

  buckets = {
    # Uploaded images are inputs: once processed, their result records the
    # source generation. Deleting them after a while saves storage.
    images = {
      name       = local.bucket_names.images
      versioning = false
      lifecycle_rules = [{
        action    = { type = "Delete" }
        condition = { age = var.images_retention_days }
      }]
    }
    # Results are the product: keep overwritten versions for a while.
    results = {
      name       = local.bucket_names.results
      versioning = true
      lifecycle_rules = [{
        action    = { type = "Delete" }
        condition = { days_since_noncurrent_time = var.noncurrent_retention_days, with_state = "ARCHIVED" }
      }]
    }
    # Models are the source of every engine: versioned so an overwrite or a
    # deletion can be undone.
    models = {
      name       = local.bucket_names.models
      versioning = true
      lifecycle_rules = [{
        action    = { type = "Delete" }
        condition = { days_since_noncurrent_time = var.noncurrent_retention_days, with_state = "ARCHIVED" }
      }]
    }
    # Engines are derived data keyed by model hash, GPU and TensorRT version;
    # stale ones (older TensorRT, retired GPUs) age out.
    engine_cache = {
      name       = local.bucket_names.engine_cache
      versioning = false
      lifecycle_rules = [{
        action    = { type = "Delete" }
        condition = { age = var.engine_cache_retention_days }
      }]
    }
    # Function source zips, named by content hash.
    function_source = {
      name          = "${var.project_id}-${var.name_prefix}-function-source"
      versioning    = false
      force_destroy = true
      lifecycle_rules = [{
        action    = { type = "Delete" }
        condition = { age = 365 }
      }]
    }
  }

  upload_notification = {
    bucket      = "images"
    topic       = module.pubsub.topic_ids["uploads"]
    event_types = ["OBJECT_FINALIZE"]
  }

  # One event per stored result (first write and every replacement that wins).
  result_notification = {
    bucket      = "results"
    topic       = module.pubsub.topic_ids["results"]
    event_types = ["OBJECT_FINALIZE"]
  }

  depends_on = [google_project_service.this]
}

module "functions" {
  source = "./modules/functions"

  project_id = var.project_id
  region     = var.region
  labels     = local.labels

  functions = {
    for key, sub in local.function_subscriptions : key => {
      name        = "${var.name_prefix}-${replace(sub.entry_point, "_", "-")}"
      entry_point = sub.entry_point
      description = "triggerfish ${sub.entry_point}: ${local.footprint.topics[sub.topic]} messages to Ray Serve"
      # A function must answer before Pub/Sub stops waiting for it.
      timeout_seconds    = sub.ack_deadline_seconds - local.function_settings.timeout_margin_seconds
      max_instance_count = local.function_settings.max_instances
      # Concurrent events in one instance share Serve calls (functions/_merge.py); each
      # has a gunicorn thread (THREADS below is the same number).
      max_instance_request_concurrency = local.function_settings.request_concurrency
      available_cpu                    = local.function_settings.available_cpu
      available_memory                 = local.function_settings.available_memory
    }
  }

  source_archive_path           = local.function_source_archive
  source_bucket                 = module.storage.bucket_names["function_source"]
  service_account_email         = google_service_account.this["functions"].email
  build_service_account_id      = google_service_account.this["functions_build"].id
  build_docker_repository       = google_artifact_registry_repository.this["functions"].id
  invoker_service_account_email = google_service_account.this["push_invoker"].email
  vpc_connector                 = module.network.vpc_connector_id
  request_timeout_s             = local.function_settings.serve_wait_seconds
  serve_request_timeout_s       = local.serve_request_timeout_s

  # Exactly the variables functions/ reads, plus gunicorn's THREADS and WORKERS;
  # the first three are the footprint's (FunctionSettings.environment()).
  environment_variables = {
    THREADS                       = tostring(local.function_settings.request_concurrency)
    WORKERS                       = tostring(local.function_settings.workers)
    TRIGGERFISH_REQUEST_TIMEOUT_S = tostring(local.function_settings.serve_wait_seconds)
    TRIGGERFISH_SERVE_URL         = local.serve_endpoint
    TRIGGERFISH_SERVE_AUDIENCE    = local.serve_audience
    TRIGGERFISH_RESULTS_BUCKET    = module.storage.bucket_names["results"]
    TRIGGERFISH_ALLOWED_BUCKETS   = join(",", local.allowed_buckets)
    TRIGGERFISH_DEFAULT_MODEL     = var.default_model
    GOOGLE_CLOUD_PROJECT          = var.project_id
  }

  depends_on = [
    google_project_service.this,
    google_storage_bucket_iam_member.functions_build_source_reader,
    google_artifact_registry_repository_iam_member.functions_build_writer,
    google_project_iam_member.functions_build_log_writer,
    google_project_iam_member.functions_build_gcf_sources_reader,
  ]
}

module "gke" {
  source = "./modules/gke"

  project_id                 = var.project_id
  name                       = var.name_prefix
  location                   = var.zone
  network                    = module.network.network_id
  subnetwork                 = module.network.nodes_subnetwork_name
  pods_range_name            = module.network.pods_range_name
  services_range_name        = module.network.services_range_name
  master_ipv4_cidr_block     = var.master_ipv4_cidr_block
  master_authorized_networks = var.master_authorized_networks
  release_channel            = var.gke_release_channel
  node_service_account_email = google_service_account.this["gke_nodes"].email
  node_network_tag           = "${var.name_prefix}-gke-node"
  cpu_pool                   = var.cpu_pool
  gpu_pool                   = var.gpu_pool
  deletion_protection        = var.deletion_protection
  labels                     = local.labels

  depends_on = [
    google_project_service.this,
    google_project_iam_member.gke_nodes,
  ]
}

module "ray" {
  source = "./modules/ray"

  project_id               = var.project_id
  region                   = var.region
  name                     = var.name_prefix
  labels                   = local.labels
  manifests_dir            = "${path.module}/../infra/k8s"
  serve_gsa_email          = google_service_account.this["serve"].email
  kuberay_chart_version    = var.kuberay_chart_version
  kuberay_image_repository = "${local.registry_host}/${var.project_id}/${google_artifact_registry_repository.upstream["quay"].repository_id}"
  image                    = local.serve_image
  ray_version              = local.ray_version

  cpu_node_pool           = module.gke.cpu_node_pool
  gpu_node_pool           = module.gke.gpu_node_pool
  gpus_per_worker         = var.gpu_pool.accelerator_count
  gpu_worker_max_replicas = var.gpu_pool.max_node_count

  model_autoscaling  = var.model_autoscaling
  serve_address_name = module.network.serve_address_name
  connector_cidr     = var.ip_ranges.connector
  network_id         = module.network.network_id
  gcs_redis          = var.gcs_redis

  # Exactly the variables the Serve application reads.
  serve_environment = {
    models              = var.models
    models_bucket       = module.storage.bucket_names["models"]
    engine_cache_bucket = module.storage.bucket_names["engine_cache"]
    results_bucket      = module.storage.bucket_names["results"]
    allowed_buckets     = local.allowed_buckets
    default_model       = var.default_model
    serve_audience      = local.serve_audience
    allowed_invokers    = local.allowed_invokers
    request_timeout_s   = local.serve_request_timeout_s
  }

  # The operator needs schedulable nodes (Helm waits for it); the Ray pods
  # need their bucket grants, the image pull grants and an admission policy
  # that lets the images in from the start.
  depends_on = [
    module.gke,
    google_project_service.this,
    google_binary_authorization_policy.this,
    google_storage_bucket_iam_member.serve_sources,
    google_storage_bucket_iam_member.serve_models,
    google_storage_bucket_iam_member.serve_results,
    google_storage_bucket_iam_member.serve_engine_cache,
    google_artifact_registry_repository_iam_member.gke_nodes_reader,
  ]
}

module "monitoring" {
  source = "./modules/monitoring"

  project_id               = var.project_id
  manifests_dir            = "${path.module}/../infra/k8s"
  namespace                = module.ray.namespace
  dead_letter_subscription = module.pubsub.subscription_names["dead_letter"]
  function_service_names   = values(module.functions.names)
  notification_channels    = var.alert_notification_channels
  thresholds               = var.alert_thresholds
  labels                   = local.labels

  # The PodMonitoring goes into the namespace the Ray module creates.
  depends_on = [module.ray]
}
