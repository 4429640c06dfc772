output "topics" {
  description = "Pub/Sub topic names: publish {\"uri\": \"gs://...\"} to requests (live) or bulk (backfills, replays); uploads is fed by the images bucket; results carries one event per stored result; dead_letter collects failed messages."
  value = merge(module.pubsub.topic_names, {
    dead_letter = module.pubsub.dead_letter_topic_name
  })
}

output "subscriptions" {
  description = "Subscription names: the push subscriptions, the results-events pull subscription (results, read by `triggerfish results`), the BigQuery one when enabled, and the dead-letter pull subscription."
  value       = module.pubsub.subscription_names
}

output "buckets" {
  description = "Bucket names: upload images to images, read result JSON from results, upload the model repository to models."
  value       = module.storage.bucket_names
}

output "serve_endpoint" {
  description = "Ray Serve HTTP endpoint on the internal load balancer (POST /v1/infer, GET /healthz); reachable from inside the VPC."
  value       = local.serve_endpoint
}

output "functions" {
  description = "Cloud Function names keyed by trigger (requests, uploads)."
  value       = module.functions.names
}

output "serve_image" {
  description = "Image the Ray pods run, by digest (REPOSITORY@sha256:...)."
  value       = local.serve_image
}

output "serve_image_repository" {
  description = "Repository to push the Serve image to (docker build -f infra/docker/Dockerfile.gpu -t REPOSITORY:TAG .)."
  value       = local.serve_image_repository
}

output "ray_version" {
  description = "Ray version of the Serve image and the RayService (requirements/RAY_VERSION)."
  value       = local.ray_version
}

output "serve_auth" {
  description = "What the Serve ingress checks: the ID token audience (TRIGGERFISH_SERVE_AUDIENCE) and the accepted service accounts (TRIGGERFISH_ALLOWED_INVOKERS)."
  value = {
    audience         = local.serve_audience
    allowed_invokers = local.allowed_invokers
  }
}

output "gke_cluster" {
  description = "GKE cluster name and location (gcloud container clusters get-credentials NAME --location LOCATION)."
  value = {
    name     = module.gke.name
    location = module.gke.location
  }
}

output "rayservice" {
  description = "Namespace and name of the RayService, of its internal load balancer Service, and the Memorystore instance behind GCS fault tolerance."
  value = {
    namespace     = module.ray.namespace
    name          = module.ray.rayservice_name
    serve_service = module.ray.serve_service_name
    gcs_redis     = module.ray.gcs_redis
  }
}

output "alert_policies" {
  description = "Cloud Monitoring alert policy ids (dead letters, function errors, Serve error rate and p95 latency)."
  value       = module.monitoring.alert_policies
}

output "deploy_check" {
  description = "What `make deploy-check` (infra/packaging/deploy_check.py) compares the running system with: the reserved Serve address, the functions' concurrency and gunicorn threads, the default model and the project/region to query."
  value = {
    project_id          = var.project_id
    region              = var.region
    serve_address       = module.network.serve_address
    default_model       = var.default_model
    request_concurrency = local.function_settings.request_concurrency
    threads             = tostring(local.function_settings.request_concurrency)
    function_timeout_s  = { for key, sub in local.function_subscriptions : key => sub.ack_deadline_seconds - local.function_settings.timeout_margin_seconds }
  }
}

output "results_bigquery_table" {
  description = "The result events table as PROJECT.DATASET.TABLE, or null when var.results_bigquery.enabled is false."
  value       = var.results_bigquery.enabled ? module.results_bigquery[0].table_id : null
}
