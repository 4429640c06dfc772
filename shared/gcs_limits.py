"""The request limits Cloud Storage's JSON API documents, checked before a request leaves.

fake-gcs-server enforces none of them: a 1,037-byte object name is written
without complaint locally and refused with HTTP 400 in the cloud. The client in
:mod:`shared.gcs` checks every object request against these rules first, so the
local stack refuses what the cloud refuses, with the same classification as the
cloud's 400 (:class:`RequestRefused`, a permanent error: the same request can
never succeed, so retrying it would only loop until it is dead-lettered).

The rules (https://cloud.google.com/storage/docs/objects#naming and
https://cloud.google.com/storage/quotas):

- an object name is 1 to 1024 bytes of UTF-8, contains no carriage return or
  line feed, is not ``.`` or ``..`` and does not start with
  ``.well-known/acme-challenge/``;
- an object's custom metadata, keys and values together, is at most 8 KiB.
"""

from __future__ import annotations

from collections.abc import Mapping

from shared.errors import ErrorReason, PermanentError

MAX_OBJECT_NAME_BYTES = 1024
MAX_CUSTOM_METADATA_BYTES = 8 * 1024
_RESERVED_PREFIX = ".well-known/acme-challenge/"


class RequestRefused(PermanentError):
    """Cloud Storage refuses the request itself (HTTP 400): sending it again cannot succeed.

    Raised both for a 400 that Cloud Storage answered and for a request that
    breaks a documented limit (checked before sending), so both are handled alike.
    """

    status = 400

    def __init__(self, message: str, reason: ErrorReason = ErrorReason.INVALID_URI) -> None:
        super().__init__(reason, message)


def object_name_problem(name: str) -> str | None:
    """Why Cloud Storage refuses ``name`` as an object name; ``None`` when it accepts it."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as err:  # lone surrogates: no UTF-8 form at all
        return f"is not valid UTF-8 ({err.reason} at character {err.start})"
    if size == 0:
        return "is empty"
    if size > MAX_OBJECT_NAME_BYTES:
        return f"is {size} bytes of UTF-8, over the limit of {MAX_OBJECT_NAME_BYTES}"
    if "\r" in name or "\n" in name:
        return "contains a carriage return or line feed"
    if name in (".", ".."):
        return f"is {name!r}, which names no object"
    if name.startswith(_RESERVED_PREFIX):
        return f"starts with the reserved prefix {_RESERVED_PREFIX!r}"
    return None


def check_object_name(bucket: str, name: str) -> None:
    """Refuse an object name Cloud Storage would refuse.

    Raises:
        RequestRefused: naming the bucket, the start of the name and the rule broken.
    """
    problem = object_name_problem(name)
    if problem is not None:
        shown = name if len(name) <= 200 else f"{name[:200]}..."
        raise RequestRefused(f"Cloud Storage refuses the object name {shown!r} in bucket {bucket!r}: it {problem}")


def custom_metadata_bytes(metadata: Mapping[str, str]) -> int:
    """The size Cloud Storage counts against the custom-metadata limit: keys plus values, in UTF-8."""
    return sum(len(k.encode("utf-8", "surrogatepass")) + len(v.encode("utf-8", "surrogatepass"))
               for k, v in metadata.items())  # fmt: skip


def check_custom_metadata(bucket: str, name: str, metadata: Mapping[str, str]) -> None:
    """Refuse custom metadata over Cloud Storage's 8 KiB per object.

    Raises:
        RequestRefused: with the size found.
    """
    size = custom_metadata_bytes(metadata)
    if size > MAX_CUSTOM_METADATA_BYTES:
        raise RequestRefused(
            f"Cloud Storage refuses {size} bytes of custom metadata on gs://{bucket}/{name[:200]}: "
            f"the limit is {MAX_CUSTOM_METADATA_BYTES}"
        )
