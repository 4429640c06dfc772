"""Use the running stack if there is one, else start one for the duration of a command."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from infra.local.stack import (
    DEFAULT_STATE_DIR,
    LocalStack,
    StackNotRunning,
    StackOptions,
    StackState,
)


@contextlib.contextmanager
def stack_for_command(quiet: bool = False) -> Iterator[StackState]:
    """Yield a running stack's state; a stack started here is stopped on exit."""
    state_dir = Path(os.environ.get("TRIGGERFISH_STATE_DIR", str(DEFAULT_STATE_DIR)))
    try:
        yield StackState.load(state_dir)
        return
    except StackNotRunning:
        pass

    def progress(msg: str) -> None:
        if not quiet:
            print(f"... {msg}", file=sys.stderr, flush=True)

    stack = LocalStack(StackOptions(state_dir=state_dir))
    try:
        yield stack.start(progress=progress)
    finally:
        progress("stopping the local stack")
        stack.stop()
