"""Cloud Storage access shared by functions and Serve: one lazily-created client
per process, and the two object operations the pipeline needs."""

from __future__ import annotations

import functools
import os

from shared.errors import ErrorReason, PermanentError, SupersededError, TransientError
from shared.uris import GcsUri


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


def read_object(uri: GcsUri, generation: str | None, max_bytes: int) -> tuple[bytes, str]:
    """Download one object, refusing it when larger than ``max_bytes``.

    Returns:
        The bytes and the generation they belong to (the current one when
        ``generation`` is ``None``), so results always say which version was read.

    Raises:
        PermanentError: ``object_missing`` (404, or the named generation is gone),
            ``image_too_large``.
        TransientError: 429/5xx, timeouts and connection errors.
    """
    from google.api_core import exceptions as gexc

    bucket = get_storage_client().bucket(uri.bucket)
    try:
        blob = bucket.get_blob(uri.name, generation=int(generation) if generation else None)
        if blob is None and generation:
            current = bucket.get_blob(uri.name)
            if current is not None and int(current.generation) > int(generation):
                raise SupersededError(
                    f"{uri} generation {generation} was replaced by generation {current.generation}"
                )
        if blob is None:
            suffix = f" generation {generation}" if generation else ""
            raise PermanentError(ErrorReason.OBJECT_MISSING, f"{uri}{suffix} does not exist")
        if blob.size is not None and blob.size > max_bytes:
            raise PermanentError(
                ErrorReason.IMAGE_TOO_LARGE,
                f"{uri} is {blob.size} bytes, limit {max_bytes}",
            )
        # get_blob() pinned the generation, so this reads exactly the notified version.
        return blob.download_as_bytes(checksum=None), str(blob.generation)
    except gexc.NotFound as err:
        raise PermanentError(ErrorReason.OBJECT_MISSING, f"{uri} does not exist") from err
    except (gexc.TooManyRequests, gexc.ServerError, gexc.RetryError) as err:
        raise TransientError(f"Cloud Storage failed reading {uri}: {err}") from err
    except (ConnectionError, TimeoutError, OSError) as err:
        raise TransientError(f"Cloud Storage unreachable reading {uri}: {err}") from err


def write_json(
    bucket: str, name: str, payload: str, metadata: dict[str, str] | None = None
) -> str:
    """Write ``payload`` as ``gs://bucket/name`` (overwriting: result paths are deterministic).

    Raises:
        TransientError: when the write fails for a reason retrying may fix.
    """
    from google.api_core import exceptions as gexc

    blob = get_storage_client().bucket(bucket).blob(name)
    if metadata:
        blob.metadata = metadata
    try:
        blob.upload_from_string(payload, content_type="application/json")
    except (gexc.TooManyRequests, gexc.ServerError, gexc.RetryError) as err:
        raise TransientError(f"Cloud Storage failed writing gs://{bucket}/{name}: {err}") from err
    except (ConnectionError, TimeoutError, OSError) as err:
        raise TransientError(f"Cloud Storage unreachable writing gs://{bucket}/{name}: {err}") from err
    return f"gs://{bucket}/{name}"
