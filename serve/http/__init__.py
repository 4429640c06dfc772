"""What callers speak: the Ingress (HTTP), the Open Inference Protocol and the per-call pipeline.

Imports down only: ``serve.model``, ``serve.imaging``, ``serve.metrics``, ``serve.model_config``, ``shared``.
"""
