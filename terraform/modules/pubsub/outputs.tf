output "topic_ids" {
  description = "Source topic ids (projects/PROJECT/topics/NAME) keyed by footprint key."
  value       = { for key, topic in google_pubsub_topic.this : key => topic.id }
}

output "topic_names" {
  description = "Source topic names keyed by footprint key."
  value       = { for key, topic in google_pubsub_topic.this : key => topic.name }
}

output "dead_letter_topic_id" {
  description = "Dead-letter topic id."
  value       = google_pubsub_topic.dead_letter.id
}

output "dead_letter_topic_name" {
  description = "Dead-letter topic name."
  value       = google_pubsub_topic.dead_letter.name
}

output "subscription_names" {
  description = "Subscription names keyed by footprint key (push, pull and BigQuery subscriptions), plus the dead-letter pull subscription under dead_letter."
  value = merge(
    { for key, sub in google_pubsub_subscription.push : key => sub.name },
    { for key, sub in google_pubsub_subscription.pull : key => sub.name },
    { for key, sub in google_pubsub_subscription.bigquery : key => sub.name },
    { dead_letter = google_pubsub_subscription.dead_letter.name },
  )
}
