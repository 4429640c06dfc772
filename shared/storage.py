"""The synchronous Cloud Storage client, for what is not on the request path:
listing and fetching the model repository and the shared engine cache. The
request path uses :mod:`shared.gcs`."""

from __future__ import annotations

import functools
import os


@functools.cache
def get_storage_client():  # noqa: ANN201 - google.cloud.storage.Client, imported lazily
    """The process-wide Storage client, created on first use (never at import).

    With ``STORAGE_EMULATOR_HOST`` set (fake-gcs-server) the client uses
    anonymous credentials, as the emulator accepts no others.
    """
    from google.cloud import storage

    project = os.environ.get("GOOGLE_CLOUD_PROJECT", "triggerfish-local")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project=project, credentials=AnonymousCredentials())
    return storage.Client(project=project)
