"""Operations against a running deployment, local or cloud: backfills and dead-letter replay.

Imports down only: ``infra.local`` (to find a local stack), ``infra.footprint``, ``shared``.
"""
