output "uris" {
  description = "HTTPS URL of each function's Cloud Run service, keyed like var.functions (the push endpoint base and OIDC audience)."
  value       = { for key, fn in google_cloudfunctions2_function.this : key => fn.service_config[0].uri }
}

output "names" {
  description = "Function names keyed like var.functions."
  value       = { for key, fn in google_cloudfunctions2_function.this : key => fn.name }
}

output "source_object" {
  description = "Name of the uploaded source zip (contains its sha256)."
  value       = google_storage_bucket_object.source.name
}
