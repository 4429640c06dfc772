"""``gs://`` URIs: parsing, validation and the allow-list of source buckets."""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass

from shared.errors import ErrorReason, PermanentError
from shared.gcs_limits import object_name_problem

# Bucket names: 3-63 chars of lowercase letters, digits, dashes, underscores and dots,
# starting and ending with a letter or digit (the dotted 222-char form is not used here).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$")


@dataclass(frozen=True, slots=True)
class GcsUri:
    """A validated reference to one object in Cloud Storage."""

    bucket: str
    name: str

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


def parse_gcs_uri(uri: str) -> GcsUri:
    """Parse ``gs://bucket/object`` into a :class:`GcsUri`.

    Raises:
        PermanentError: with reason ``invalid_uri`` naming the offending value.
    """
    if not isinstance(uri, str) or not uri.startswith("gs://"):
        raise PermanentError(ErrorReason.INVALID_URI, f"expected a gs:// URI, got {uri!r}")
    bucket, sep, name = uri[len("gs://") :].partition("/")
    # fullmatch: `$` alone would also accept a bucket name ending in a newline.
    if not _BUCKET_RE.fullmatch(bucket):
        raise PermanentError(ErrorReason.INVALID_URI, f"invalid bucket name {bucket!r} in {uri!r}")
    if not sep or not name or name.endswith("/"):
        raise PermanentError(ErrorReason.INVALID_URI, f"URI {uri!r} names no object")
    # Cloud Storage's own naming rules: a name it would refuse names no object it holds.
    problem = object_name_problem(name)
    if problem is not None:
        raise PermanentError(ErrorReason.INVALID_URI, f"invalid object name in {uri[:300]!r}: it {problem}")
    return GcsUri(bucket=bucket, name=name)


def check_allowed(uri: GcsUri, allowed_buckets: Collection[str]) -> None:
    """Reject objects outside the configured source buckets.

    Raises:
        PermanentError: with reason ``bucket_not_allowed``.
    """
    if uri.bucket not in allowed_buckets:
        raise PermanentError(
            ErrorReason.BUCKET_NOT_ALLOWED,
            f"bucket {uri.bucket!r} is not one of the allowed source buckets {sorted(allowed_buckets)}",
        )
