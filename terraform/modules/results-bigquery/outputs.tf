output "table_id" {
  description = "The events table as PROJECT.DATASET.TABLE, for the subscription's bigquery_config; known only once the service agent may write to it."
  value       = "${google_bigquery_table.events.project}.${google_bigquery_table.events.dataset_id}.${google_bigquery_table.events.table_id}"

  # A BigQuery subscription is refused while its writer lacks access to the table.
  depends_on = [google_bigquery_dataset_iam_member.pubsub_writer]
}

output "dataset_id" {
  description = "The dataset holding the events table."
  value       = google_bigquery_dataset.this.dataset_id
}
