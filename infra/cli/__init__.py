"""The ``triggerfish`` command line: argument parsing and terminal output for every subcommand.

Imports down only: ``infra.ops``, ``infra.local``, ``infra.bench``, ``infra.footprint``, ``serve``, ``shared``.
"""
