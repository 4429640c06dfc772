"""The Grafana dashboard of triggerfish, and drawing it from Prometheus where Grafana is not at hand."""
