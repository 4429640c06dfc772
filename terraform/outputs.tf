output "topics" {
  description = "Pub/Sub topic names: publish {\"uri\": \"gs://...\"} to requests; uploads is fed by the images bucket; dead_letter collects failed messages."
  value = merge(module.pubsub.topic_names, {
    dead_letter = module.pubsub.dead_letter_topic_name
  })
}

output "subscriptions" {
  description = "Subscription names: the two push subscriptions and the dead-letter pull subscription."
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
  description = "Image the Ray pods run; build and push it from infra/docker/Dockerfile.gpu."
  value       = local.serve_image
}

output "serve_image_repository" {
  description = "Artifact Registry path to push the Serve image to."
  value       = "${google_artifact_registry_repository.this["serve"].location}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.this["serve"].repository_id}"
}

output "gke_cluster" {
  description = "GKE cluster name and location (gcloud container clusters get-credentials NAME --location LOCATION)."
  value = {
    name     = module.gke.name
    location = module.gke.location
  }
}

output "rayservice" {
  description = "Namespace and name of the RayService and of its internal load balancer Service."
  value = {
    namespace     = module.ray.namespace
    name          = module.ray.rayservice_name
    serve_service = module.ray.serve_service_name
  }
}
