"""The caller's deadline (``x-triggerfish-deadline``) and how Serve's own timeouts nest under it.

The chain, outermost first (cloud defaults):

1. the Pub/Sub ack deadline (180 s, ``infra/footprint.json``);
2. the function's timeout: the ack deadline minus 30 s (150 s, Terraform);
3. the function's wait on Serve, ``TRIGGERFISH_REQUEST_TIMEOUT_S`` (120 s): the function
   sends ``now + request_timeout_s`` as this header;
4. Serve's work deadline: the header's value minus :data:`ANSWER_MARGIN_S`, so the
   Ingress answers (``503`` with per-input results) before the function stops reading;
5. the Ingress -> model call: that work deadline plus :data:`HANDLE_GRACE_S`
   (still below the header's value); the model's batch queue drops items at the work deadline.

A header is honoured up to :data:`MAX_DEADLINE_S` from now whatever Serve's own
``TRIGGERFISH_REQUEST_TIMEOUT_S`` is, so a Serve deployment whose setting is shorter
than the functions' no longer cuts short what a function waits for; a call without the
header gets ``request_timeout_s``.

Only a plain decimal number of epoch seconds is a deadline: NaN, infinities, exponents,
zero, negative values and values more than :data:`MAX_DEADLINE_S` ahead (epoch
milliseconds, typically) are refused with :class:`BadDeadline` (HTTP 400
``bad_deadline``), which names the value. A deadline already past is
:class:`DeadlinePassed`: nobody waits for the answer, so no work is done (HTTP 503,
retryable: a caller whose clock is skewed retries rather than losing its message).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from shared.messages import DEADLINE_HEADER

# Serve answers this long before the caller's deadline, so the answer arrives in time.
ANSWER_MARGIN_S = 2.0
# The Ingress waits this much longer than the model's work deadline for the model's answer.
HANDLE_GRACE_S = 1.0
# The longest any caller may ask Serve to work on a call (above Pub/Sub's 600 s maximum ack deadline).
MAX_DEADLINE_S = 900.0
# Epoch seconds, optionally with a fraction: "1795239515.250". No sign, exponent, nan or inf.
_DECIMAL = re.compile(r"[0-9]{1,15}(\.[0-9]{1,9})?")


class BadDeadline(ValueError):
    """The deadline header is not a finite, positive, plausible epoch time."""


class DeadlinePassed(Exception):
    """The caller's deadline has already passed: no one waits for the answer."""


@dataclass(frozen=True, slots=True)
class CallDeadline:
    """When the caller stops waiting, and when Serve must have its answer ready (epoch seconds)."""

    caller: float
    work: float

    def remaining(self, now: float | None = None) -> float:
        """Seconds left for the work (negative once it has passed)."""
        return self.work - (time.time() if now is None else now)


def parse_deadline(raw: str | None, default_s: float, now: float | None = None) -> CallDeadline:
    """The deadline of a call whose header value is ``raw`` (``None`` when absent).

    Raises:
        BadDeadline: the header is present but not a usable deadline (names the value).
        DeadlinePassed: the header names a time already past, or too close to answer in.
    """
    now = time.time() if now is None else now
    if raw is None:
        caller = now + default_s
    else:
        text = raw.strip()
        if not _DECIMAL.fullmatch(text):
            raise BadDeadline(
                f"{DEADLINE_HEADER} must be epoch seconds as a plain decimal number, got {raw[:64]!r}"
            )
        caller = float(text)
        if caller <= 0:
            raise BadDeadline(f"{DEADLINE_HEADER} must be positive, got {raw[:64]!r}")
        if caller > now + MAX_DEADLINE_S:
            raise BadDeadline(
                f"{DEADLINE_HEADER} {raw[:64]!r} is more than {MAX_DEADLINE_S:.0f} s ahead "
                "(epoch seconds, not milliseconds)"
            )
    work = caller - ANSWER_MARGIN_S
    if work <= now:
        raise DeadlinePassed(f"{DEADLINE_HEADER} {raw!r} leaves no time to work (now {now:.3f})")
    return CallDeadline(caller, work)


__all__ = [
    "ANSWER_MARGIN_S",
    "BadDeadline",
    "CallDeadline",
    "DeadlinePassed",
    "HANDLE_GRACE_S",
    "MAX_DEADLINE_S",
    "parse_deadline",
]
