"""Chaos knobs for the reliability scenarios: faults injected on purpose, never on by default.

``TRIGGERFISH_CHAOS_FAIL_LOAD=MODEL/VERSION[,MODEL/VERSION...]``: the first replica on
this machine to load MODEL/VERSION fails that load once with a transient error. The
replica that claims the fault is the one that atomically creates a marker file in
``$TRIGGERFISH_CHAOS_DIR`` (default: the system temp dir); every later load, by it or
by another replica, proceeds normally. Delete the marker to arm the fault again.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from shared.errors import TransientError

FAIL_LOAD_ENV = "TRIGGERFISH_CHAOS_FAIL_LOAD"
CHAOS_DIR_ENV = "TRIGGERFISH_CHAOS_DIR"


class InjectedLoadFailure(TransientError):
    """The transient load failure that ``TRIGGERFISH_CHAOS_FAIL_LOAD`` asks for."""


def fail_load_targets(env: Mapping[str, str]) -> frozenset[str]:
    """``MODEL/VERSION`` entries named by the knob."""
    return frozenset(part.strip() for part in env.get(FAIL_LOAD_ENV, "").split(",") if part.strip())


def marker_path(model: str, version: str, env: Mapping[str, str]) -> Path:
    directory = Path(env.get(CHAOS_DIR_ENV) or tempfile.gettempdir())
    digest = hashlib.sha256(f"{model}/{version}".encode()).hexdigest()[:16]
    return directory / f"triggerfish-chaos-fail-load-{digest}"


def maybe_fail_load(model: str, version: str, env: Mapping[str, str] | None = None) -> None:
    """Raise :class:`InjectedLoadFailure` if this is the first load of a targeted version here."""
    env = os.environ if env is None else env
    if f"{model}/{version}" not in fail_load_targets(env):
        return
    marker = marker_path(model, version, env)
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return  # another load (maybe another replica's) already took the fault
    with os.fdopen(fd, "w") as f:
        f.write(f"{model}/{version} pid {os.getpid()}\n")
    raise InjectedLoadFailure(f"chaos: injected transient failure loading {model}/{version} ({FAIL_LOAD_ENV})")
