"""The caller's deadline header: finite, positive, plausible epoch seconds, or refused by name."""

from __future__ import annotations

import pytest

from serve.http.deadline import (
    ANSWER_MARGIN_S,
    MAX_DEADLINE_S,
    BadDeadline,
    DeadlinePassed,
    parse_deadline,
)

NOW = 1_800_000_000.0


def test_a_valid_header_is_honoured_beyond_serves_own_default() -> None:
    # The function waits 120 s; Serve's own default (60 s) must not cut that short.
    deadline = parse_deadline(f"{NOW + 120:.3f}", default_s=60, now=NOW)

    assert deadline.caller == pytest.approx(NOW + 120)
    assert deadline.work == pytest.approx(NOW + 120 - ANSWER_MARGIN_S)
    assert deadline.remaining(NOW) == pytest.approx(120 - ANSWER_MARGIN_S)


def test_without_a_header_the_default_applies() -> None:
    deadline = parse_deadline(None, default_s=60, now=NOW)

    assert deadline.caller == NOW + 60 and deadline.work == NOW + 60 - ANSWER_MARGIN_S


@pytest.mark.parametrize(
    "raw",
    ["nan", "NaN", "inf", "Infinity", "-inf", "-1", "0", "0.0", "1e9", "1_800_000_000", "0x6b49d200",
     "", " ", "soon", "1800000000.5.5", "9" * 400, "1800000000\x00"],
)  # fmt: skip
def test_anything_but_a_finite_positive_decimal_is_refused_naming_the_value(raw: str) -> None:
    with pytest.raises(BadDeadline) as info:
        parse_deadline(raw, default_s=60, now=NOW)

    assert "x-triggerfish-deadline" in str(info.value)
    assert repr(raw[:64]) in str(info.value)


def test_a_value_too_far_ahead_is_refused_as_probably_milliseconds() -> None:
    with pytest.raises(BadDeadline, match="milliseconds"):
        parse_deadline(f"{NOW * 1000:.0f}", default_s=60, now=NOW)
    with pytest.raises(BadDeadline, match="more than 900 s ahead"):
        parse_deadline(f"{NOW + MAX_DEADLINE_S + 1:.3f}", default_s=60, now=NOW)


@pytest.mark.parametrize("offset", [-5.0, 0.0, ANSWER_MARGIN_S])
def test_a_deadline_that_leaves_no_time_is_passed_not_bad(offset: float) -> None:
    with pytest.raises(DeadlinePassed):
        parse_deadline(f"{NOW + offset:.3f}", default_s=60, now=NOW)
