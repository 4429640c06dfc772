output "bucket_names" {
  description = "Bucket names keyed by role."
  value       = { for key, bucket in google_storage_bucket.this : key => bucket.name }
}

output "bucket_urls" {
  description = "gs:// URLs keyed by role."
  value       = { for key, bucket in google_storage_bucket.this : key => bucket.url }
}

output "upload_notification_id" {
  description = "Id of the upload notification on the images bucket."
  value       = google_storage_notification.upload.notification_id
}

output "result_notification_id" {
  description = "Id of the result notification on the results bucket."
  value       = google_storage_notification.results.notification_id
}
