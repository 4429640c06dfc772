"""Measurement: the entry-path bench with its Beam peer, CPU metering, reliability scenarios, the GPU check.

Imports down only: ``infra.local``, ``infra.footprint``, ``serve``, ``shared``.
"""
