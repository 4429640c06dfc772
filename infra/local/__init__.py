"""The local stack: emulators, functions, the push dispatcher and Ray Serve started and stopped on this machine.

Imports down only: ``infra.footprint``, ``serve``, ``shared``.
"""
