"""One deployment per model: versions, the batch queue, loading and validation.

Imports down only: ``serve.imaging``, ``serve.engines``, ``serve.postprocess``, ``serve.metrics``, ``serve.model_config``, ``shared``.
"""
