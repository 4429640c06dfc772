"""Exceptions shared by the functions and the Serve application.

One root exception, two kinds below it: a *permanent* problem is recorded as
an error result and the triggering message is acknowledged; a *transient* one
is raised so that Pub/Sub redelivers the message with backoff.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorReason(StrEnum):
    """Why an input could not be turned into an ``ok`` result (stable, machine-readable)."""

    MALFORMED_MESSAGE = "malformed_message"
    INVALID_URI = "invalid_uri"
    BUCKET_NOT_ALLOWED = "bucket_not_allowed"
    OBJECT_MISSING = "object_missing"
    ACCESS_DENIED = "access_denied"
    NOT_AN_IMAGE = "not_an_image"
    IMAGE_TOO_LARGE = "image_too_large"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    INFERENCE_FAILED = "inference_failed"


class TriggerfishError(Exception):
    """Root of every error raised by triggerfish code."""


class ConfigError(TriggerfishError):
    """A setting (environment variable or config file field) has a bad value."""


class PermanentError(TriggerfishError):
    """The input can never succeed; record it and do not retry.

    Attributes:
        reason: The machine-readable reason written into the error result.
    """

    def __init__(self, reason: ErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SupersededError(TriggerfishError):
    """The event names an object generation that a newer upload replaced.

    The newer generation's own event produces the result, so this one is
    acknowledged without writing anything (writing would clobber the newer result).
    """


class TransientError(TriggerfishError):
    """A dependency is unavailable or slow; retrying later may succeed."""
