"""JSON log lines with ``severity``."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from shared.logging import JsonFormatter


def _record(
    level: int, msg: str, *args: object, exc_info: object = None, **extra: object
) -> logging.LogRecord:
    return logging.getLogger("triggerfish.test").makeRecord(
        "triggerfish.test", level, __file__, 10, msg, args, exc_info, extra=extra or None
    )


@pytest.mark.parametrize(
    ("level", "severity"),
    [
        (logging.DEBUG, "DEBUG"),
        (logging.INFO, "INFO"),
        (logging.WARNING, "WARNING"),
        (logging.ERROR, "ERROR"),
        (logging.CRITICAL, "CRITICAL"),
        (25, "DEFAULT"),
    ],
)
def test_each_level_maps_to_a_cloud_logging_severity(level: int, severity: str) -> None:
    line = JsonFormatter().format(_record(level, "hello"))

    assert json.loads(line)["severity"] == severity


def test_a_line_is_one_json_object_with_message_and_extra_fields() -> None:
    line = JsonFormatter().format(
        _record(
            logging.WARNING, "recorded %s for %d", "error", 3, reason="not_an_image", uri=object()
        )
    )

    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "recorded error for 3"
    assert entry["logger"] == "triggerfish.test"
    assert entry["reason"] == "not_an_image"
    assert entry["uri"].startswith("<object object")  # non-JSON values are stringified
    assert entry["time"].endswith("+00:00")
    for internal in ("args", "msg", "levelno", "pathname", "exc_info"):
        assert internal not in entry


def test_an_exception_is_carried_as_text() -> None:
    try:
        raise RuntimeError("engine exploded")
    except RuntimeError:
        exc_info = sys.exc_info()

    entry = json.loads(JsonFormatter().format(_record(logging.ERROR, "failed", exc_info=exc_info)))

    assert entry["severity"] == "ERROR"
    assert "Traceback" in entry["exception"]
    assert "RuntimeError: engine exploded" in entry["exception"]


def test_no_exception_key_without_an_exception() -> None:
    assert "exception" not in json.loads(JsonFormatter().format(_record(logging.INFO, "fine")))
