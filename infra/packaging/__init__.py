"""Packaging for the cloud: the Cloud Functions source archive.

Imports down only: the standard library.
"""
