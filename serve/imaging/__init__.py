"""Bytes in, a model input out: JPEG/PNG decoding, resize, crop and normalize, on the CPU or the GPU.

Imports down only: ``serve.model_config``, ``serve.cpus``, ``shared``.
"""
